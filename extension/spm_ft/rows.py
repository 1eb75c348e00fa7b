"""Row → sample maps of a UNet call, for every CFG layout (webui.md §4.4).

A1111 stacks ``x_in = [cond rows: sample i repeated repeats[i] times…,
uncond rows: 0..B-1]`` (edit models add a second uncond block) and may run it
in several calls, each on a view ``x_in[a:b]``. Forge/reForge concatenate
chunks of B rows (one per entry of ``cond_or_uncond``), so row r is sample r % B.
When no map can be built the caller falls back to the batch max (``None``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence


def a1111_layout(repeats: Sequence[int], uncond_blocks: int = 1) -> List[int]:
    """Sample index of every row of A1111's stacked ``x_in``."""
    rows: List[int] = []
    for i, r in enumerate(repeats):
        rows.extend([i] * int(r))
    b = len(repeats)
    for _ in range(uncond_blocks):
        rows.extend(range(b))
    return rows


def view_offset(base_ptr: int, row_bytes: int, total_rows: int, ptr: int, n: int) -> Optional[int]:
    """Row offset of a view ``x_in[a:a+n]`` from data pointers, or None if the
    tensor is not such a view (another extension replaced it, or reshaped it)."""
    if row_bytes <= 0:
        return None
    d = ptr - base_ptr
    if d < 0 or d % row_bytes:
        return None
    a = d // row_bytes
    if a + n > total_rows:
        return None
    return a


def a1111_call_rows(layout: Sequence[int], offset: Optional[int], n: int) -> Optional[List[int]]:
    """Samples of the n rows of one call starting at ``offset`` of the layout."""
    if offset is None or offset < 0 or offset + n > len(layout):
        return None
    return list(layout[offset : offset + n])


def a1111_rows_for_tensor(x_in, x, layout: Sequence[int]) -> Optional[List[int]]:
    """Convenience over torch tensors: ``x`` must be a row-slice view of ``x_in``."""
    try:
        if x_in is None or x.shape[1:] != x_in.shape[1:] or x_in.shape[0] != len(layout):
            return None
        if x_in.shape[0] == 0:
            return None
        if not x_in.is_contiguous():
            return None
        row_bytes = x_in[0].numel() * x_in.element_size()
        off = view_offset(x_in.data_ptr(), row_bytes, x_in.shape[0], x.data_ptr(), x.shape[0])
        return a1111_call_rows(layout, off, x.shape[0])
    except Exception:
        return None


def forge_rows(n: int, cond_or_uncond: Optional[Sequence[int]]) -> Optional[List[int]]:
    """Forge/reForge: whole chunks of B rows; the sample of row r is r % B."""
    if not cond_or_uncond:
        return None
    k = len(cond_or_uncond)
    if n <= 0 or n % k:
        return None
    b = n // k
    return [r % b for r in range(n)]


def row_gates(sample_gates: Sequence[float], rows: Optional[Sequence[int]], n: int):
    """Per-row gates for a call of n rows; ``(gates, exact)``. Without a map
    (or with an out-of-range sample) every row gets the batch max: never a
    weaker erasure than the strongest sample asks for."""
    if rows is not None and len(rows) == n and all(0 <= r < len(sample_gates) for r in rows):
        return [float(sample_gates[r]) for r in rows], True
    m = max((float(g) for g in sample_gates), default=0.0)
    return [m] * n, False
