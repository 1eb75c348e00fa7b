"""Infotext values: ``SPM gates: name=0.83, …`` per image, metric and failure note."""

from __future__ import annotations

from typing import Dict, List, Optional



def format_gates(gates: Dict[str, float]) -> str:
    return ", ".join(f"{n}={float(g):.2f}" for n, g in sorted(gates.items()))


def job_index(p, index, all_prompts, n_images):
    """The index of an image in the whole job, from the arguments that the
    WebUI's ``create_infotext`` passes to a callable value (its locals).

    Inside the generation loop the WebUI calls ``create_infotext`` with the
    prompts of the current batch and ``index`` relative to that batch (A1111
    v1.10.1 ``modules/processing.py:1026-1027``, Forge dfdcbab6
    ``modules/processing.py:1031-1032``); ``Processed.infotext`` and the
    before-hires save pass the job's prompts and a job index (A1111 l.609-610
    and l.1381). So: a list shorter than the job means a batch-relative index,
    and ``p.iteration`` (set per batch, A1111 l.933) gives the batch."""
    if index is None:
        return 0
    index = int(index)
    if all_prompts is not None and p is not None and len(all_prompts) < n_images:
        index += int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
    return index


class _PerImage:
    """Callable infotext value (A1111 >= 1.9 and Forge call it with the locals of
    ``create_infotext`` as keywords: ``p``, ``index``, ``all_prompts``, …)."""

    def __init__(self, per_image):
        self.per_image = list(per_image or [])

    def text(self, i) -> Optional[str]:
        raise NotImplementedError

    def __call__(self, p=None, index=None, all_prompts=None, **kw) -> Optional[str]:
        if not self.per_image:
            return None
        i = job_index(p, index, all_prompts, len(self.per_image))
        return self.text(min(max(i, 0), len(self.per_image) - 1))

    def __str__(self):  # a plain str() (older WebUIs) gives the first image
        return self(index=0) or ""


class PerImageGates(_PerImage):
    """``SPM gates: spm=0.83, …`` of each image of the job."""

    def text(self, i):
        return format_gates(self.per_image[i]) or None


class PerImageSource(_PerImage):
    """``SPM gate source``: where each image's gates came from, only written
    when the sidecar could not be used: ``cache`` (the client cache, sidecar
    unreachable), ``forced 1.0`` (fail closed) or ``sidecar``."""

    WORDS = {"sidecar": "sidecar", "cache": "cache", "forced": "forced 1.0"}

    def __init__(self, base, hires=None):
        super().__init__(base)
        self.hires = list(hires) if hires is not None else None

    def text(self, i):
        s = self.WORDS.get(self.per_image[i], self.per_image[i])
        if self.hires is not None and i < len(self.hires) and self.hires[i] != self.per_image[i]:
            s += f" (hires: {self.WORDS.get(self.hires[i], self.hires[i])})"
        return s


def failure_note(reason: str) -> str:
    return f"sidecar failed, gates forced to 1.0 (full erasure): {reason}"


def degraded_note(reason: str, forced: bool, cached: bool) -> str:
    """The note when the sidecar could not be used; ``SPM gate source`` says
    which images got which."""
    if forced and not cached:
        return failure_note(reason)
    if cached and not forced:
        return f"sidecar unreachable, gates from the client cache: {reason}"
    return (f"sidecar failed: gates from the client cache where the prompt was cached, "
            f"else forced to 1.0 (full erasure), see SPM gate source: {reason}")


def metric_text(metric: str, curve: str) -> str:
    return f"{metric}, curve {curve}"
