"""Row → sample maps for every CFG layout of webui.md §4.4."""

import torch

from spm_ft.rows import (a1111_call_rows, a1111_layout, a1111_rows_for_tensor, forge_rows, row_gates,
                         view_offset)


def x_in_for(repeats, uncond_blocks=1, c=4, h=2, w=2):
    n = sum(repeats) + uncond_blocks * len(repeats)
    return torch.zeros(n, c, h, w)


def test_layout_plain_and_and():
    assert a1111_layout([1, 1, 1]) == [0, 1, 2, 0, 1, 2]
    # AND sub-prompts: sample 0 has 2 cond rows, sample 2 has 3
    assert a1111_layout([2, 1, 3]) == [0, 0, 1, 2, 2, 2, 0, 1, 2]
    # edit (instruct-pix2pix) models: a second uncond block
    assert a1111_layout([1, 2], uncond_blocks=2) == [0, 1, 1, 0, 1, 0, 1]


def test_single_call():
    rep = [2, 1, 3]
    L = a1111_layout(rep)
    x_in = x_in_for(rep)
    assert a1111_rows_for_tensor(x_in, x_in, L) == L
    assert a1111_rows_for_tensor(x_in, x_in[:], L) == L


def test_chunked_calls_batch_cond_uncond():
    # token lengths differ: cond in chunks of 2B, then uncond as the last B rows
    rep = [2, 1, 3]
    B = len(rep)
    L = a1111_layout(rep)
    x_in = x_in_for(rep)
    S = sum(rep)
    got = []
    for a in range(0, S, 2 * B):
        b = min(a + 2 * B, S)
        got += a1111_rows_for_tensor(x_in, x_in[a:b], L)
    got += a1111_rows_for_tensor(x_in, x_in[-B:], L)
    assert got == L
    assert a1111_rows_for_tensor(x_in, x_in[S:], L) == [0, 1, 2]


def test_chunks_of_b_without_batch_cond_uncond():
    rep = [1, 2, 1, 1]
    B = len(rep)
    L = a1111_layout(rep)
    x_in = x_in_for(rep)
    got = []
    for a in range(0, x_in.shape[0], B):
        got += a1111_rows_for_tensor(x_in, x_in[a:a + B], L)
    assert got == L


def test_skip_uncond():
    # skip_early_cond / s_min_uncond: only the S cond rows are run
    rep = [1, 3]
    L = a1111_layout(rep)
    x_in = x_in_for(rep)
    x_cond = x_in[:-len(rep)]
    assert a1111_rows_for_tensor(x_in, x_cond, L) == [0, 1, 1, 1]


def test_edit_model_layout():
    rep = [1, 1]
    L = a1111_layout(rep, uncond_blocks=2)
    x_in = x_in_for(rep, uncond_blocks=2)
    assert a1111_rows_for_tensor(x_in, x_in, L) == [0, 1, 0, 1, 0, 1]
    assert a1111_rows_for_tensor(x_in, x_in[2:4], L) == [0, 1]


def test_not_a_view_falls_back():
    rep = [1, 1]
    L = a1111_layout(rep)
    x_in = x_in_for(rep)
    assert a1111_rows_for_tensor(x_in, x_in.clone(), L) is None  # replaced by another callback
    assert a1111_rows_for_tensor(x_in, torch.zeros(2, 4, 3, 3), L) is None  # different shape
    assert a1111_rows_for_tensor(x_in_for([1, 1, 1]), x_in, L) is None  # length mismatch
    assert a1111_rows_for_tensor(None, x_in, L) is None
    assert view_offset(1000, 16, 4, 1008, 1) is None  # inside a row
    assert view_offset(1000, 16, 4, 992, 1) is None  # before the base
    assert view_offset(1000, 16, 4, 1032, 3) is None  # past the end
    assert view_offset(1000, 16, 4, 1032, 2) == 2
    assert a1111_call_rows([0, 1, 0, 1], None, 2) is None


def test_forge_cond_or_uncond():
    assert forge_rows(6, [0, 1]) == [0, 1, 2, 0, 1, 2]
    # AND sub-prompts are extra cond chunks of B rows
    assert forge_rows(9, [0, 0, 1]) == [0, 1, 2] * 3
    assert forge_rows(3, [1]) == [0, 1, 2]  # uncond-only call (memory split)
    assert forge_rows(4, [0]) == [0, 1, 2, 3]  # cond-only (skip uncond / cfg 1)
    assert forge_rows(5, [0, 1]) is None
    assert forge_rows(4, []) is None and forge_rows(4, None) is None


def test_row_gates_exact_and_fallback():
    g = [0.2, 0.9, 0.5]
    assert row_gates(g, [0, 1, 2, 0, 1, 2], 6) == ([0.2, 0.9, 0.5, 0.2, 0.9, 0.5], True)
    assert row_gates(g, None, 4) == ([0.9] * 4, False)
    assert row_gates(g, [0, 5], 2) == ([0.9, 0.9], False)
    assert row_gates(g, [0, 1], 3) == ([0.9] * 3, False)
    assert row_gates([], None, 2) == ([0.0, 0.0], False)
