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
# Prompt normalisation of the sidecar before token gating: "reference" (the
# default, as the SPM reference) or "strict" (NFKC, zero-width and combining
# marks stripped, confusables folded), used for always-on moderation membranes.
NORMALIZE = ("reference", "strict")

# Where a prompt's gates came from (GateResult.sources).
FROM_SIDECAR = "sidecar"
FROM_CACHE = "cache"  # the client cache, while the sidecar was unreachable
FORCED = "forced"  # fail closed: 1.0


@dataclass
class GateResult:
    """``gates[i][name]`` is the strength for prompt i (already m² under the
    reference curve: apply it linearly).

    ``sources[i]`` says where prompt i's gates came from: ``"sidecar"`` (a live
    answer, or the cache while the sidecar is up), ``"cache"`` (the client cache
    while the sidecar is unreachable) or ``"forced"`` (fail closed: 1.0).
    ``failed`` means at least one prompt was forced to 1.0; ``reason`` is set
    whenever the sidecar could not be used (failed, or served from the cache)."""

    gates: List[Dict[str, float]]
    failed: bool = False
    reason: str = ""
    metric: str = ""
    curve: str = ""
    cached: int = 0
    details: List[Dict[str, dict]] = field(default_factory=list)
    sources: List[str] = field(default_factory=list)
    normalize: str = "reference"

    def __post_init__(self):
        if not self.sources:
            self.sources = [FORCED if self.failed else FROM_SIDECAR for _ in self.gates]

    @property
    def degraded(self) -> bool:
        """Some gates did not come from a live sidecar (forced, or from the cache)."""
        return any(s != FROM_SIDECAR for s in self.sources)


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
        normalize: str = "reference",
    ) -> GateResult:
        """Strengths for every prompt × membrane. Never raises.

        Prompts found in the cache are not sent again, but the sidecar is still
        asked (``/v1/gate`` for the others, else ``/healthz``) so that a dead
        sidecar is noticed: then cached prompts keep their cached gates, marked
        ``"cache"``, and every other prompt fails closed (1.0, ``"forced"``).
        Any failure (down, slow, HTTP error, malformed answer) fails closed."""
        names = tuple(sorted(set(membranes)))
        prompts = list(prompts)
        if not names:
            return GateResult([{} for _ in prompts], metric=metric, curve=curve, normalize=normalize)

        keys = [(p, names, metric, curve, normalize) for p in prompts]
        found = {k: self._get(k) for k in keys}
        hits = sum(1 for k in keys if found[k] is not None)

        def result(reason: str = "") -> GateResult:
            gates, details, sources = [], [], []
            for k in keys:
                d = found[k]
                if d is None:  # fail closed
                    gates.append({n: 1.0 for n in names})
                    details.append({})
                    sources.append(FORCED)
                else:
                    gates.append({n: float(d[n]["strength"]) for n in names})
                    details.append(d)
                    sources.append(FROM_CACHE if reason else FROM_SIDECAR)
            return GateResult(gates, failed=FORCED in sources, reason=reason, metric=metric, curve=curve,
                              cached=hits, details=details, sources=sources, normalize=normalize)

        if not self.url:
            return result("no sidecar URL configured")
        missing = list(dict.fromkeys(k[0] for k in keys if found[k] is None))
        if not missing:
            # Everything is cached: one cheap liveness check, so that gates
            # served while the sidecar is down are reported as such.
            try:
                status, _ = self._request("GET", "/healthz")
            except Exception as e:
                reason = getattr(e, "reason", None) or e
                return result(f"sidecar unreachable or too slow ({type(e).__name__}: {reason})")
            if status != 200:
                return result(f"sidecar health check answered HTTP {status}")
            return result()
        body = {"prompts": missing, "membranes": list(names), "metric": metric, "curve": curve}
        if normalize != "reference":  # the sidecar's default; older sidecars do not know the field
            body["normalize"] = normalize
        try:
            self.requests_made += 1
            status, js = self._request("POST", "/v1/gate", body)
        except Exception as e:  # URLError, timeout, connection reset, bad JSON…
            reason = getattr(e, "reason", None) or e
            return result(f"sidecar unreachable or too slow ({type(e).__name__}: {reason})")
        if status != 200:
            msg = js.get("error") if isinstance(js, dict) else None
            return result(f"sidecar answered HTTP {status}: {msg or 'no details'}")
        try:
            results = js["results"]
            if len(results) != len(missing):
                raise ValueError("result count differs from prompt count")
            fresh = {}
            for p, r in zip(missing, results):
                g = r["gates"]
                for n in names:
                    s = float(g[n]["strength"])
                    if not (s == s) or s < 0:  # NaN or negative
                        raise ValueError(f"bad strength {s} for {n}")
                fresh[p] = {n: dict(g[n]) for n in names}
        except Exception as e:
            return result(f"malformed sidecar answer ({type(e).__name__}: {e})")
        for p, d in fresh.items():
            self._put((p, names, metric, curve, normalize), d)
            found[(p, names, metric, curve, normalize)] = d
        return result()
