"""WebUI-agnostic orchestration of one generation job.

From the job's prompts (and hires prompts), the SPM tags found in them, the
always-on list and the sidecar answer, build per-image gates
``gate = ceiling × strength`` (the user's ``<lora:spm:w>`` is the ceiling;
always-on membranes have ceiling 1 or the weight given in the settings).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from . import infotext
from .client import FORCED, FROM_CACHE, FROM_SIDECAR, GateClient, GateResult
from .prompts import and_count, parse_lora_tags, strip_lora_tags


@dataclass
class Membrane:
    name: str  # canonical name: the file stem, as the sidecar names it
    path: Optional[str]


@dataclass
class JobGates:
    base: List[Dict[str, float]]  # per image of the job
    hires: List[Dict[str, float]]
    repeats: List[int]  # AND sub-prompts per image (base prompts)
    hr_repeats: List[int]
    membranes: Dict[str, Membrane]
    result: GateResult
    base_prompts: List[str] = field(default_factory=list)  # prompts with SPM tags stripped
    hr_prompts: List[str] = field(default_factory=list)
    taken_over: set = field(default_factory=set)  # tag names removed from the prompts

    @property
    def failed(self) -> bool:
        return self.result.failed

    def batch(self, batch_number: int, batch_size: int, hires: bool = False) -> Dict[str, List[float]]:
        """``{membrane: [gate of sample 0..B-1]}`` for one batch of the job."""
        src = self.hires if hires else self.base
        rows = src[batch_number * batch_size : (batch_number + 1) * batch_size]
        out: Dict[str, List[float]] = {}
        for name in self.membranes:
            out[name] = [r.get(name, 0.0) for r in rows]
        return out

    def batch_repeats(self, batch_number: int, batch_size: int, hires: bool = False) -> List[int]:
        src = self.hr_repeats if hires else self.repeats
        return src[batch_number * batch_size : (batch_number + 1) * batch_size]

    def infotext_params(self) -> Dict[str, object]:
        out: Dict[str, object] = {}
        if not self.membranes:
            return out
        out["SPM gates"] = infotext.PerImageGates(self.base)
        if self.hr_prompts and self.hires != self.base:
            out["SPM hires gates"] = infotext.PerImageGates(self.hires)
        out["SPM metric"] = infotext.metric_text(self.result.metric, self.result.curve)
        if self.result.degraded:
            out["SPM gate source"] = infotext.PerImageSource(self.sources, self.hr_sources if self.hr_prompts else None)
            out["SPM note"] = infotext.degraded_note(self.result.reason, self.failed, FROM_CACHE in self.result.sources)
        return out

    @property
    def sources(self) -> List[str]:
        return self.result.sources[: len(self.base)]

    @property
    def hr_sources(self) -> List[str]:
        return self.result.sources[len(self.base):] if self.hr_prompts else self.sources


def merge_results(parts: Sequence[GateResult], n: int, metric: str, curve: str) -> GateResult:
    """One result from the per-normalisation requests of a job: gates are
    united per prompt; a prompt's source is the worst of its parts."""
    if len(parts) == 1:
        return parts[0]
    rank = {FROM_SIDECAR: 0, FROM_CACHE: 1, FORCED: 2}
    gates: List[Dict[str, float]] = [{} for _ in range(n)]
    details: List[Dict[str, dict]] = [{} for _ in range(n)]
    sources = [FROM_SIDECAR] * n
    for r in parts:
        for i in range(n):
            gates[i].update(r.gates[i])
            if r.details:
                details[i].update(r.details[i])
            if rank[r.sources[i]] > rank[sources[i]]:
                sources[i] = r.sources[i]
    reasons = [f"{r.normalize} normalisation: {r.reason}" for r in parts if r.reason]
    return GateResult(gates, failed=any(r.failed for r in parts), reason="; ".join(reasons), metric=metric,
                      curve=curve, cached=sum(r.cached for r in parts), details=details, sources=sources)


def compute_job(
    prompts: Sequence[str],
    hr_prompts: Optional[Sequence[str]],
    always_on: Dict[str, float],
    resolve_file: Callable[[str], Optional[str]],
    is_spm: Callable[[str], bool],
    client: GateClient,
    metric: str,
    curve: str,
    take_over_prompt_spms: bool = True,
) -> JobGates:
    """One sidecar call for all prompts (hires prompts included)."""
    membranes: Dict[str, Membrane] = {}
    taken: set = set()
    spm_cache: Dict[str, Optional[str]] = {}

    def spm_of(tag_name: str) -> Optional[str]:
        if tag_name not in spm_cache:
            path = resolve_file(tag_name)
            if path and is_spm(path):
                stem = os.path.splitext(os.path.basename(path))[0]
                membranes.setdefault(stem, Membrane(stem, path))
                spm_cache[tag_name] = stem
            else:
                spm_cache[tag_name] = None
        return spm_cache[tag_name]

    for name in always_on:
        path = resolve_file(name)
        stem = os.path.splitext(os.path.basename(path))[0] if path else name
        membranes.setdefault(stem, Membrane(stem, path))
    always = {}
    for name, w in always_on.items():
        path = resolve_file(name)
        stem = os.path.splitext(os.path.basename(path))[0] if path else name
        always[stem] = max(always.get(stem, 0.0), float(w))

    def ceilings_and_clean(text: str):
        ceil = dict(always)
        strip = []
        if take_over_prompt_spms:
            for t in parse_lora_tags(text):
                stem = spm_of(t.name)
                if stem is None:
                    continue
                strip.append(t.name)
                taken.add(t.name)
                ceil[stem] = max(ceil.get(stem, 0.0), float(t.unet))
        return ceil, strip_lora_tags(text, strip)

    base = [ceilings_and_clean(p) for p in prompts]
    hr = [ceilings_and_clean(p) for p in (hr_prompts or [])]
    clean = [c for _, c in base] + [c for _, c in hr]
    wanted = sorted({n for ceil, _ in base + hr for n in ceil})
    # Always-on (moderation) membranes are gated on the strictly normalised
    # prompt, so that spellings such as "pi\u200bka\u200bchu" cannot evade them;
    # SPMs named in the prompt use the reference normalisation. One request per
    # kind (at most two per job).
    strict = [n for n in wanted if n in always]
    plain = [n for n in wanted if n not in always]
    parts = []
    if strict:
        parts.append(client.gates(clean, strict, metric=metric, curve=curve, normalize="strict"))
    if plain:
        parts.append(client.gates(clean, plain, metric=metric, curve=curve))
    result = merge_results(parts, len(clean), metric, curve)

    def combine(pairs, gates):
        out = []
        for (ceil, _), g in zip(pairs, gates):
            row = {n: 0.0 for n in wanted}  # every membrane of the job, 0 where not asked for
            row.update({n: float(c) * float(g.get(n, 1.0)) for n, c in ceil.items()})
            out.append(row)
        return out

    base_g = combine(base, result.gates[: len(base)])
    hr_g = combine(hr, result.gates[len(base):]) if hr else list(base_g)
    return JobGates(
        base=base_g,
        hires=hr_g,
        repeats=[and_count(c) for _, c in base],
        hr_repeats=[and_count(c) for _, c in hr] if hr else [and_count(c) for _, c in base],
        membranes={n: membranes.get(n, Membrane(n, None)) for n in wanted},
        result=result,
        base_prompts=[c for _, c in base],
        hr_prompts=[c for _, c in hr],
        taken_over=taken,
    )
