"""Functional application: instance forward hooks adding ``g[row]·scale·up(down(x))``.

No class-level patching: each target layer gets one ``register_forward_hook``.
A :class:`GateContext` holds the current per-row gates of every membrane; the
WebUI adapters set it before each UNet call (from the row maps in ``rows``).
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .membranes import PlanEntry


class GateContext:
    """Current gates: ``{membrane: per-row list or scalar}``; None = inactive."""

    def __init__(self):
        self._local = threading.local()
        self.gates: Optional[Dict[str, object]] = None
        self.exact = True  # False when a batch max stood in for per-row gates
        self.on_inexact = None  # called by a hook that applies inexact (batch-max) gates

    def set(self, gates: Optional[Dict[str, object]], exact: bool = True):
        self.gates = gates
        self.exact = exact

    def clear(self):
        self.gates = None

    def for_rows(self, name: str, n: int, device, dtype):
        """Gate tensor broadcastable over an n-row output, or None for 0/absent."""
        g = (self.gates or {}).get(name)
        if g is None:
            return None
        if isinstance(g, (int, float)):
            if g == 0:
                return None
            return torch.tensor(float(g), device=device, dtype=dtype)
        vals = list(g)
        if len(vals) != n:
            m = max(vals, default=0.0)  # unknown layout: the batch max
            if m == 0:
                return None
            return torch.tensor(float(m), device=device, dtype=dtype)
        if all(v == 0 for v in vals):
            return None
        return torch.tensor(vals, device=device, dtype=dtype)


class _Target:
    __slots__ = ("membranes", "handle")

    def __init__(self):
        self.membranes: List[tuple] = []  # (name, down, up, scale, cache)
        self.handle = None


def _is_conv(module) -> bool:
    return isinstance(module, torch.nn.Conv2d) or (
        hasattr(module, "stride") and hasattr(module, "padding") and getattr(module, "weight", None) is not None
        and getattr(module.weight, "dim", lambda: 0)() == 4
    )


def _as_conv(w):
    return w if w.dim() == 4 else w.reshape(w.shape[0], w.shape[1], 1, 1)


def _as_linear(w):
    if w.dim() == 2:
        return w
    if w.dim() == 4 and w.shape[2] == 1 and w.shape[3] == 1:
        return w.reshape(w.shape[0], w.shape[1])
    raise ValueError(f"cannot use a {tuple(w.shape)} factor on a Linear layer")


def lora_delta(module, x, down, up):
    """``up(down(x))`` without scale; conv down uses the layer's stride/padding."""
    if _is_conv(module):
        d = _as_conv(down)
        h = F.conv2d(
            x, d, stride=module.stride, padding=module.padding,
            dilation=getattr(module, "dilation", 1),
        )
        return F.conv2d(h, _as_conv(up))
    return F.linear(F.linear(x, _as_linear(down)), _as_linear(up))


class MembraneHooks:
    """Owns the forward hooks of every membrane on every target layer."""

    def __init__(self, ctx: Optional[GateContext] = None):
        self.ctx = ctx or GateContext()
        self._targets: Dict[int, _Target] = {}
        self._modules: Dict[int, object] = {}
        self.installed: Dict[str, int] = {}

    def add(self, name: str, plan: Sequence[PlanEntry]):
        """Hook membrane ``name`` onto the layers of its plan (idempotent per name/layer)."""
        count = 0
        for e in plan:
            key = id(e.module)
            t = self._targets.get(key)
            if t is None:
                t = _Target()
                t.handle = e.module.register_forward_hook(self._make_hook(t))
                self._targets[key] = t
                self._modules[key] = e.module
            if any(m[0] == name and m[5] == e.key for m in t.membranes):
                continue
            t.membranes.append((name, e.down, e.up, float(e.scale), {}, e.key))
            count += 1
        self.installed[name] = self.installed.get(name, 0) + count
        return count

    def has(self, name: str) -> bool:
        return self.installed.get(name, 0) > 0

    def _make_hook(self, target: _Target):
        ctx = self.ctx

        def hook(module, args, out):
            if not ctx.gates or not args or not torch.is_tensor(out):
                return None
            if not ctx.exact and ctx.on_inexact is not None:
                ctx.on_inexact()
            x = args[0]
            n = out.shape[0]
            extra = None
            for name, down, up, scale, cache, _ in target.membranes:
                g = ctx.for_rows(name, n, out.device, out.dtype)
                if g is None:
                    continue
                ck = (x.device, x.dtype)
                fac = cache.get(ck)
                if fac is None:
                    fac = (down.to(device=x.device, dtype=x.dtype), up.to(device=x.device, dtype=x.dtype))
                    cache.clear()
                    cache[ck] = fac
                d = lora_delta(module, x, fac[0], fac[1]).to(out.dtype)
                if g.dim() == 1:
                    g = g.reshape((n,) + (1,) * (d.dim() - 1))
                d = d * (g * scale)
                extra = d if extra is None else extra + d
            if extra is None:
                return None
            return out + extra

        return hook

    def remove(self):
        for t in self._targets.values():
            if t.handle is not None:
                t.handle.remove()
        self._targets.clear()
        self._modules.clear()
        self.installed.clear()
        self.ctx.clear()

    def __len__(self):
        return len(self._targets)
