"""overheard.topk: exact top-k with lowest-index ties, equal to a full stable sort."""

from __future__ import annotations

import math

import torch

from overheard.topk import beam_topk, topk_lowest_index


def _sorted_ref(x: torch.Tensor, k: int):
    v, i = torch.sort(x, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def _tied(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # few distinct values -> many ties; some -inf (banned tokens, frozen beams)
    x = torch.randint(0, 4, shape, generator=g).double()
    x[torch.rand(shape, generator=g) < 0.3] = -math.inf
    return x


def test_topk_lowest_index_equals_a_stable_sort():
    for seed in range(20):
        for n, k in ((7, 1), (7, 3), (50, 5), (50, 50)):
            x = _tied((6, n), seed)
            x[0] = -math.inf  # a row that is all ties at -inf
            v, i = topk_lowest_index(x, k)
            rv, ri = _sorted_ref(x, k)
            assert torch.equal(i, ri) and torch.equal(v, rv)
            v2, i2 = topk_lowest_index(x, k, by_value=False)
            assert torch.equal(i2, torch.sort(ri, dim=1).values)
            assert torch.equal(v2, x.gather(1, i2))
    y = torch.randn(4, 1000, dtype=torch.float64)
    v, i = topk_lowest_index(y, 10)
    assert torch.equal(i, _sorted_ref(y, 10)[1])


def test_beam_topk_equals_a_stable_sort_over_all_beams_and_tokens():
    for seed in range(20):
        for b, nb, v, k in ((3, 3, 11, 3), (2, 4, 5, 4), (5, 1, 9, 1), (1, 3, 3, 3)):
            cand = _tied((b, nb, v), seed)
            top, idx = beam_topk(cand, k)
            rv, ri = _sorted_ref(cand.view(b, nb * v), k)
            assert torch.equal(idx, ri) and torch.equal(top, rv)
