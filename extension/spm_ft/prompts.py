"""Prompt helpers: ``<lora:…>`` tag parsing and stripping, AND sub-prompt counts.

Tag grammar (WebUI extra networks): ``<KIND:ITEM:ITEM…>`` with KIND ``lora``
(alias ``lyco``). Positional items are ``NAME:TE:UNET:DYN``; an item containing
``=`` is named (``te=``, ``unet=``, ``dyn=``). ``unet`` defaults to ``te``, which
defaults to 1.0. SPMs are UNet-only, so their ceiling is the ``unet`` value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, List, Optional

_TAG = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float
    unet: float
    dyn: Optional[int]
    start: int
    end: int
    raw: str


def _num(s: str, default: float) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return default


def parse_lora_tags(prompt: str) -> List[LoraTag]:
    """Every ``<lora:…>``/``<lyco:…>`` tag of a prompt, in order."""
    out: List[LoraTag] = []
    for m in _TAG.finditer(prompt or ""):
        if m.group(1).lower() not in LORA_KINDS:
            continue
        items = m.group(2).split(":")
        pos, named = [], {}
        for it in items:
            if "=" in it:
                k, v = it.split("=", 1)
                named[k.strip().lower()] = v.strip()
            else:
                pos.append(it)
        if not pos or not pos[0].strip():
            continue
        name = pos[0].strip()
        te_s = named.get("te", pos[1] if len(pos) > 1 else None)
        te = _num(te_s, 1.0) if te_s is not None else 1.0
        unet_s = named.get("unet", pos[2] if len(pos) > 2 else None)
        unet = _num(unet_s, te) if unet_s is not None else te
        dyn_s = named.get("dyn", pos[3] if len(pos) > 3 else None)
        try:
            dyn = int(dyn_s) if dyn_s is not None else None
        except ValueError:
            dyn = None
        out.append(LoraTag(name, te, unet, dyn, m.start(), m.end(), m.group(0)))
    return out


def strip_lora_tags(prompt: str, names: Iterable[str]) -> str:
    """Remove the lora tags whose name is in ``names``; other text is untouched."""
    names = set(names)
    if not names or not prompt:
        return prompt
    tags = [t for t in parse_lora_tags(prompt) if t.name in names]
    for t in reversed(tags):
        prompt = prompt[: t.start] + prompt[t.end :]
    return prompt


def strip_all_tags(prompt: str) -> str:
    """Remove every ``<kind:…>`` extra-network tag (the text the model sees)."""
    return _TAG.sub("", prompt or "")


def and_count(prompt: str) -> int:
    """Number of AND sub-prompts (cond rows per sample in A1111's CFG batch)."""
    return len(_AND.split(prompt or ""))


def parse_always_on(setting: str) -> dict:
    """``"nsfw, violence:0.8"`` → ``{"nsfw": 1.0, "violence": 0.8}`` (ceilings)."""
    out = {}
    for part in (setting or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.partition(":")
        name = name.strip()
        if name:
            out[name] = max(out.get(name, 0.0), _num(w, 1.0) if w else 1.0)
    return out


def drop_extra_networks(data, names) -> int:
    """Remove the ``lora``/``lyco`` entries named in ``names`` from parsed
    extra-network data (``{kind: [params, …]}``; the built-in Lora loader takes
    a tag's name from ``params.positional[0]``, its fields without ``=``).
    Returns how many were removed."""
    names = set(names)
    removed = 0
    for kind in list(data):
        if str(kind).lower() not in LORA_KINDS:
            continue
        keep = []
        for params in data[kind]:
            pos = getattr(params, "positional", None) or []
            if pos and str(pos[0]).strip() in names:
                removed += 1
            else:
                keep.append(params)
        data[kind][:] = keep
    return removed
