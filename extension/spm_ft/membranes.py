"""Membrane files: safetensors header reading, SPM detection, LoRA factors and hook plans."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

MAX_HEADER_BYTES = 64 * 1024 * 1024


class HeaderError(ValueError):
    pass


def read_header(path: str, cap: int = MAX_HEADER_BYTES) -> dict:
    """The JSON header of a safetensors file (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise HeaderError(f"{path}: too short for a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > cap:
            raise HeaderError(f"{path}: header length {n} out of range (cap {cap})")
        body = f.read(n)
        if len(body) != n:
            raise HeaderError(f"{path}: truncated header")
    try:
        head = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path}: bad header JSON: {e}") from e
    if not isinstance(head, dict):
        raise HeaderError(f"{path}: header is not an object")
    return head


def read_metadata(path: str) -> Dict[str, str]:
    """``__metadata__`` of a safetensors file ({} when absent)."""
    meta = read_header(path).get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def is_spm_metadata(meta: Dict[str, str]) -> bool:
    """An SPM carries its erased concepts in a non-empty ``prompts`` key (kohya
    conversions by ``spm convert`` keep it)."""
    p = meta.get("prompts") if isinstance(meta, dict) else None
    return isinstance(p, str) and bool(p.strip())


def is_spm_file(path: str) -> bool:
    """True for an SPM safetensors file; False for anything else or unreadable."""
    if not path or not str(path).lower().endswith(".safetensors"):
        return False
    try:
        return is_spm_metadata(read_metadata(path))
    except (OSError, HeaderError):
        return False


def find_membrane_file(name: str, dirs) -> Optional[str]:
    """``<dir>/<name>.safetensors`` in the first of ``dirs`` that has it (recursive)."""
    target = f"{name}.safetensors".lower()
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for root, _, files in os.walk(d):
            for f in files:
                if f.lower() == target:
                    return os.path.join(root, f)
    return None


# (down, up, alpha) with alpha None when the file has none (scale 1).
Factors = Tuple["object", "object", Optional[float]]


def load_factors(path: str, unet_only: bool = True) -> Dict[str, Factors]:
    """kohya-named LoRA factors: ``{"lora_unet_…": (down, up, alpha)}`` as torch tensors."""
    from safetensors.torch import load_file

    sd = load_file(path, device="cpu")
    out: Dict[str, list] = {}
    for k, v in sd.items():
        for suffix, slot in ((".lora_down.weight", 0), (".lora_up.weight", 1), (".alpha", 2)):
            if k.endswith(suffix):
                base = k[: -len(suffix)]
                if unet_only and not base.startswith("lora_unet_"):
                    break
                out.setdefault(base, [None, None, None])[slot] = v
                break
    res: Dict[str, Factors] = {}
    for base, (d, u, a) in out.items():
        if d is None or u is None:
            continue
        res[base] = (d, u, float(a.item()) if a is not None else None)
    return res


@dataclass
class PlanEntry:
    key: str
    module: "object"
    down: "object"
    up: "object"
    scale: float


def lora_scale(down, alpha: Optional[float]) -> float:
    rank = int(down.shape[0])
    return (float(alpha) / rank) if alpha is not None and rank > 0 else 1.0


def build_plan(
    factors: Dict[str, Factors], resolve: Callable[[str], Optional["object"]]
) -> Tuple[List[PlanEntry], List[str]]:
    """Resolve each factor name to a module; returns (plan, unresolved names).

    ``resolve`` is WebUI-specific (kohya name → the live Linear/Conv2d layer)."""
    plan, missing = [], []
    for key in sorted(factors):
        down, up, alpha = factors[key]
        mod = resolve(key)
        if mod is None:
            missing.append(key)
            continue
        plan.append(PlanEntry(key, mod, down, up, lora_scale(down, alpha)))
    return plan, missing
