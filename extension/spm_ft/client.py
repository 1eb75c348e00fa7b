"""Sidecar client (stdlib only): one POST /v1/gate per batch, LRU cache, fail closed."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

METRICS = ("clipcos_tokenuni", "clipcos", "tokenuni", "allone")
CURVES = ("reference", "linear")


@dataclass
class GateResult:
    """``gates[i][name]`` is the strength for prompt i (already m² under the
    reference curve: apply it linearly). ``failed`` means every gate is 1.0."""

    gates: List[Dict[str, float]]
    failed: bool = False
    reason: str = ""
    metric: str = ""
    curve: str = ""
    cached: int = 0
    details: List[Dict[str, dict]] = field(default_factory=list)


class GateClient:
    def __init__(self, url: str, token: str = "", timeout: float = 2.0, cache_size: int = 1024):
        self.url = (url or "").rstrip("/")
        self.token = token or ""
        self.timeout = float(timeout)
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[tuple, Dict[str, dict]]" = OrderedDict()
        self._lock = threading.Lock()
        self.requests_made = 0

    # -- cache ---------------------------------------------------------------
    def _get(self, key):
        with self._lock:
            v = self._cache.get(key)
            if v is not None:
                self._cache.move_to_end(key)
            return v

    def _put(self, key, value):
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def clear_cache(self):
        with self._lock:
            self._cache.clear()

    # -- HTTP ----------------------------------------------------------------
    def _request(self, method: str, path: str, body: Optional[dict] = None):
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, json.loads(r.read().decode("utf-8") or "null")
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read().decode("utf-8") or "null")
            except Exception:
                payload = None
            return e.code, payload

    def health(self) -> Optional[dict]:
        try:
            st, js = self._request("GET", "/healthz")
            return js if st == 200 else None
        except Exception:
            return None

    def gates(
        self,
        prompts: Sequence[str],
        membranes: Sequence[str],
        metric: str = "clipcos_tokenuni",
        curve: str = "reference",
    ) -> GateResult:
        """Strengths for every prompt × membrane. Never raises: any failure
        (down, slow, HTTP error, malformed answer) gives gate 1.0 everywhere."""
        names = tuple(sorted(set(membranes)))
        prompts = list(prompts)
        if not names:
            return GateResult([{} for _ in prompts], metric=metric, curve=curve)

        def closed(reason: str) -> GateResult:
            return GateResult(
                [{n: 1.0 for n in names} for _ in prompts],
                failed=True,
                reason=reason,
                metric=metric,
                curve=curve,
                details=[{} for _ in prompts],
            )

        if not self.url:
            return closed("no sidecar URL configured")
        keys = [(p, names, metric, curve) for p in prompts]
        found = {k: self._get(k) for k in keys}
        hits = sum(1 for k in keys if found[k] is not None)
        missing = list(dict.fromkeys(k[0] for k in keys if found[k] is None))
        if missing:
            body = {"prompts": missing, "membranes": list(names), "metric": metric, "curve": curve}
            try:
                self.requests_made += 1
                status, js = self._request("POST", "/v1/gate", body)
            except Exception as e:  # URLError, timeout, connection reset, bad JSON…
                reason = getattr(e, "reason", None) or e
                return closed(f"sidecar unreachable or too slow ({type(e).__name__}: {reason})")
            if status != 200:
                msg = js.get("error") if isinstance(js, dict) else None
                return closed(f"sidecar answered HTTP {status}: {msg or 'no details'}")
            try:
                results = js["results"]
                if len(results) != len(missing):
                    raise ValueError("result count differs from prompt count")
                for p, r in zip(missing, results):
                    g = r["gates"]
                    for n in names:
                        s = float(g[n]["strength"])
                        if not (s == s) or s < 0:  # NaN or negative
                            raise ValueError(f"bad strength {s} for {n}")
                    self._put((p, names, metric, curve), {n: dict(g[n]) for n in names})
                    found[(p, names, metric, curve)] = {n: dict(g[n]) for n in names}
            except Exception as e:
                return closed(f"malformed sidecar answer ({type(e).__name__}: {e})")
        details = [found[k] for k in keys]
        return GateResult(
            [{n: float(d[n]["strength"]) for n in names} for d in details],
            metric=metric,
            curve=curve,
            cached=hits,
            details=details,
        )
