"""Infotext values: ``SPM gates: name=0.83, …`` per image, metric and failure note."""

from __future__ import annotations

from typing import Dict, List, Optional



def format_gates(gates: Dict[str, float]) -> str:
    return ", ".join(f"{n}={float(g):.2f}" for n, g in sorted(gates.items()))


class PerImageGates:
    """Callable infotext value (A1111 ≥ 1.9 and Forge evaluate callables with
    ``p`` and ``index``): the gates of image ``index`` of the whole job."""

    def __init__(self, per_image: Optional[List[Dict[str, float]]] = None):
        self.per_image: List[Dict[str, float]] = list(per_image or [])

    def __call__(self, p=None, index=None, iteration=None, position_in_batch=None, **kw) -> Optional[str]:
        if index is None:
            bs = getattr(p, "batch_size", 1) or 1
            index = (iteration or 0) * bs + (position_in_batch or 0)
        if not self.per_image:
            return None
        i = min(max(int(index), 0), len(self.per_image) - 1)
        s = format_gates(self.per_image[i])
        return s or None

    def __str__(self):  # a plain str() (older WebUIs) gives the first image
        return self(index=0) or ""


def failure_note(reason: str) -> str:
    return f"sidecar failed, gates forced to 1.0 (full erasure): {reason}"


def metric_text(metric: str, curve: str) -> str:
    return f"{metric}, curve {curve}"
