"""Per-job runtime shared by the WebUI adapters (duck-typed; no ``modules`` import).

The script (``scripts/spm_membranes.py``) creates one :class:`Runtime` per job in
``process``, calls :meth:`begin_sampling` from ``process_before_every_sampling``
(hooks the UNet layers, idempotent: Forge calls it twice with hires), feeds the
A1111 CFG layout from ``on_cfg_denoiser`` and closes it in ``postprocess``.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

from .apply import MembraneHooks
from .job import JobGates
from .membranes import build_plan, load_factors
from .rows import a1111_layout, a1111_rows_for_tensor, forge_rows, row_gates

LOG_PREFIX = "[SPM FT]"

_FACTOR_CACHE: Dict[tuple, dict] = {}


def cached_factors(path: str) -> dict:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    f = _FACTOR_CACHE.get(key)
    if f is None:
        if len(_FACTOR_CACHE) >= 16:
            _FACTOR_CACHE.clear()
        f = _FACTOR_CACHE[key] = load_factors(path)
    return f


class Runtime:
    def __init__(self, job: JobGates, log: Callable[[str], None] = print):
        self.job = job
        self.log = log
        self.hooks = MembraneHooks()
        self.sample_gates: Dict[str, List[float]] = {}
        self.layout: Optional[List[int]] = None
        self.x_in = None
        self.per_batch_only = False  # True once a batch max stood in for per-row gates
        self.mode = None  # "a1111" | "forge" | "batch"
        self._pre_handles: Dict[int, object] = {}
        self._batch = (0, 1, False)
        self.notes: List[str] = []
        self.params: Optional[dict] = None  # p.extra_generation_params, for infotext notes

    # -- membranes -------------------------------------------------------
    def install(self, resolve: Callable[[str], Optional[object]]):
        """Hook every membrane of the job onto the layers ``resolve`` finds."""
        for name, m in self.job.membranes.items():
            if self.hooks.has(name):
                continue
            if not m.path or not os.path.isfile(m.path):
                self._note(f"membrane {name}: file not found; it cannot be applied")
                continue
            try:
                plan, missing = build_plan(cached_factors(m.path), resolve)
            except Exception as e:  # a broken file must not crash the generation
                self._note(f"membrane {name}: cannot load ({type(e).__name__}: {e})")
                continue
            if not plan:
                self._note(f"membrane {name}: no layer of this model matches its keys")
                continue
            if missing:
                self.log(f"{LOG_PREFIX} {name}: {len(missing)} of {len(plan) + len(missing)} layers not found")
            else:
                self.log(f"{LOG_PREFIX} {name}: {len(plan)} layers hooked")
            self.hooks.add(name, plan)

    def _note(self, msg, log=True):
        if log:
            self.log(f"{LOG_PREFIX} {msg}")
        if msg not in self.notes:
            self.notes.append(msg)
            if self.params is not None:
                old = self.params.get("SPM note")
                self.params["SPM note"] = f"{old}; {msg}" if old else msg

    # -- gates -------------------------------------------------------------
    def begin_sampling(self, batch_number: int, batch_size: int, hires: bool, mode: str):
        """Select the batch's per-sample gates. Until a row map is known every
        row gets the batch max (safe for erasure)."""
        self._batch = (batch_number, batch_size, hires)
        self.mode = mode
        self.sample_gates = self.job.batch(batch_number, batch_size, hires)
        self.layout = None
        self.x_in = None
        self.hooks.ctx.set({n: max(g, default=0.0) for n, g in self.sample_gates.items()}, exact=False)
        mixed = any(len(set(g)) > 1 for g in self.sample_gates.values())
        self.hooks.ctx.on_inexact = (
            (lambda: self.mark_per_batch("no row map for this UNet call; using the max gate of the batch"))
            if mixed else None)
        if mode == "batch":
            self.mark_per_batch("this WebUI exposes no per-row control; using the max gate of the batch")

    def mark_per_batch(self, why: str):
        if not self.per_batch_only:
            self.per_batch_only = True
            self.log(f"{LOG_PREFIX} per-batch gating: {why}")
            self._note("per-batch gating (max gate of the batch)", log=False)

    def _set_rows(self, rows, n):
        gates, exact_all = {}, True
        for name, g in self.sample_gates.items():
            gates[name], exact = row_gates(g, rows, n)
            exact_all &= exact
        if not exact_all and any(len(set(g)) > 1 for g in self.sample_gates.values()):
            self.mark_per_batch("the rows of a UNet call could not be mapped to samples")
        self.hooks.ctx.set(gates, exact_all)

    # A1111 ---------------------------------------------------------------
    def a1111_cfg(self, x_in):
        """From ``on_cfg_denoiser``: the stacked ``x_in`` of this step."""
        bn, bs, hires = self._batch
        reps = self.job.batch_repeats(bn, bs, hires)
        b = len(reps)
        n = int(x_in.shape[0])
        s = sum(reps)
        if n == s + b:
            self.layout = a1111_layout(reps)
        elif n == s + 2 * b:
            self.layout = a1111_layout(reps, uncond_blocks=2)  # edit models
        elif n == 2 * b:  # AND count differs from ours (e.g. another extension): 1 row each
            self.layout = a1111_layout([1] * b)
        else:
            self.layout = None
        self.x_in = x_in

    def a1111_pre(self, x):
        """From a pre-hook on ``denoiser.inner_model``: one call on ``x_in[a:b]``."""
        rows = a1111_rows_for_tensor(self.x_in, x, self.layout) if self.layout else None
        self._set_rows(rows, int(x.shape[0]))

    def _hooked(self, module) -> bool:
        """Whether ``module`` already has our pre-hook. The entry holds the module
        itself: an ``id`` alone can be reused by a new object once the old one is
        freed (A1111 builds a new sampler, and so a new ``inner_model``, for every
        batch and for the hires pass), which would leave the new one unhooked."""
        entry = self._pre_handles.get(id(module))
        return entry is not None and entry[0] is module

    def install_a1111_prehook(self, inner_model):
        if self._hooked(inner_model):
            return

        def pre(module, args, kwargs=None):
            if args:
                self.a1111_pre(args[0])
            return None

        self._pre_handles[id(inner_model)] = (inner_model, inner_model.register_forward_pre_hook(pre))

    # Forge / reForge -----------------------------------------------------
    def forge_pre(self, x, transformer_options):
        cou = (transformer_options or {}).get("cond_or_uncond")
        rows = forge_rows(int(x.shape[0]), cou)
        self._set_rows(rows, int(x.shape[0]))

    def install_forge_prehook(self, diffusion_model):
        if self._hooked(diffusion_model):
            return

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            if x is not None:
                self.forge_pre(x, kwargs.get("transformer_options") or {})
            return None

        self._pre_handles[id(diffusion_model)] = (
            diffusion_model, diffusion_model.register_forward_pre_hook(pre, with_kwargs=True))

    # -- teardown -------------------------------------------------------------
    def close(self):
        for _, h in self._pre_handles.values():
            h.remove()
        self._pre_handles.clear()
        self.hooks.remove()
