"""Dobi-SVD (Qinsi Wang et al. 2025, arXiv:2502.02723) against independent computations: the
truncated SVD of the token outputs, SVD-LLM's Cholesky route, a brute-force scan of the budget
shift, and the direction a trained position must move."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from amrc_exp.compress.config import ScheduleConfig
from amrc_exp.compress.dobi import learn_positions, soft_truncate, truncation_mask
from amrc_exp.compress.probe import Probe
from amrc_exp.math.allocate import LayerSpec, allocate_positions, total_params
from amrc_exp.math.decompose import decompose, dobi_spectrum, svdllm_spectrum


def test_weight_update_is_the_truncated_token_output_and_svdllms_optimum():
    """W_hat_r = W Q_r Q_r^T makes X W_hat_r the rank-r truncated SVD of X W (Eckart-Young, computed
    here from X W itself); with a positive definite Gram it is SVD-LLM's W_hat_r (Cholesky route),
    and sum_{j>r} sigma_j^2 is the measured token error."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64) * torch.linspace(0.05, 3, 8, dtype=torch.float64)
    w = torch.randn(8, 6, generator=g, dtype=torch.float64)
    sp = dobi_spectrum(w, x.T @ x)
    ref_sp = svdllm_spectrum(w, x.T @ x)
    p, s, qh = torch.linalg.svd(x @ w, full_matrices=False)
    for r in (1, 3, 5):
        assert torch.allclose(x @ sp.approx(r), (p[:, :r] * s[:r]) @ qh[:r], atol=1e-9)
        assert torch.allclose(sp.approx(r), ref_sp.approx(r), atol=1e-8)
        u, v = sp.factors(r, torch.float64)
        assert torch.allclose(u @ v.T, sp.approx(r), atol=1e-9)
        measured = float(torch.linalg.matrix_norm(x @ (w - sp.approx(r))) ** 2)
        assert float(sp.sigma[r:].square().sum()) == pytest.approx(measured, rel=1e-8)


def test_weight_update_needs_no_inverse_of_a_singular_gram():
    """3 tokens, 7 channels: the Gram has rank 3. W_hat_r is still W Q_r Q_r^T with finite
    factors, and it reproduces the token outputs exactly from rank 3 on."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sp = decompose("dobi", w, G=x.T @ x)
    assert torch.isfinite(sp.left).all() and sp.rank_cap == 5
    for r in (1, 2):
        _, s, _ = torch.linalg.svd(x @ w)
        assert float(torch.linalg.matrix_norm(x @ (w - sp.approx(r))) ** 2) == pytest.approx(
            float(s[r:].square().sum()), rel=1e-8)
    assert torch.allclose(x @ sp.approx(3), x @ w, atol=1e-9)


def test_soft_truncation_with_a_sharp_mask_is_the_hard_rank_k_truncation():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.tensor([9.0, 5, 3, 2, 1, 0.5], dtype=torch.float64)
    p, s, qh = torch.linalg.svd(a, full_matrices=False)
    for k in (1, 3, 5):
        out = soft_truncate(a, torch.tensor(k + 0.5, dtype=torch.float64), beta=50.0)
        assert torch.allclose(out, (p[:, :k] * s[:k]) @ qh[:k], atol=1e-9)
    mask = truncation_mask(torch.tensor(2.0), 4, beta=10.0)  # the tanh mask, by hand
    expect = [0.5 * math.tanh(10.0 * (2 - i)) + 0.5 for i in (1, 2, 3, 4)]
    assert mask.tolist() == pytest.approx(expect, abs=1e-7)


def _brute_positions(positions, specs, to_remove, min_rank):
    """The largest shift (on a 1e-3 grid) whose ceil(position + shift) ranks meet the budget."""
    final = sum(s.dense_params for s in specs) - to_remove
    best = None
    for step in range(-40000, 40001):
        shift = step / 1000
        ranks = []
        for p, s in zip(positions, specs):
            r = min(max(math.ceil(p + shift - 1e-9), min_rank), min(s.n_in, s.n_out))
            ranks.append(r if r <= s.break_even_rank else None)
        if total_params(specs, ranks) <= final:
            best = ranks
    return best


@pytest.mark.parametrize("to_remove", [300, 700, 1200])
def test_positions_become_the_ranks_of_the_largest_shift_that_meets_the_budget(to_remove):
    specs = [LayerSpec("a", 16, 24), LayerSpec("b", 24, 16), LayerSpec("c", 16, 48)]
    positions = [3.2, 11.7, 7.05]
    ranks = allocate_positions(positions, specs, to_remove, min_rank=0)
    assert ranks == _brute_positions(positions, specs, to_remove, 0)
    assert sum(s.dense_params for s in specs) - total_params(specs, ranks) >= to_remove


class _TwoPaths(nn.Module):
    """logits = head(used(x)) + 0 * unused(x), averaged over tokens: only `used` matters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.used, self.unused = nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            for m in (self.used, self.unused, self.head):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.used(x)).mean(1) + 0.0 * self.unused(x).mean(1).sum(-1, keepdim=True)


def test_trained_positions_move_rank_from_a_layer_the_loss_ignores_to_one_it_needs():
    """Both layers start at the budget's uniform rank; the task loss only sees `used`, so
    training must raise its position and lower the ignored layer's (the penalty holds the
    total), and the model's own weights must not change."""
    torch.manual_seed(0)
    model = _TwoPaths()
    images = torch.randn(64, 10, 8)  # 64 "images" of 10 tokens
    with torch.no_grad():
        labels = model(images).argmax(-1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = {"used": model.used, "unused": model.unused}
    specs = [LayerSpec("used", 8, 8), LayerSpec("unused", 8, 8)]
    to_remove = 64  # kept fraction 0.5: uniform position 2 of 8
    pos = learn_positions(model, layers, Probe(images, labels, batch_size=16), specs, to_remove,
                          ScheduleConfig("dobi", epochs=30, lr=0.02, beta=2.0, penalty=5.0), seed=0)
    assert pos["used"] > 2.5 and pos["unused"] < 1.5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_positions_need_labelled_probe_images():
    model = _TwoPaths()
    with pytest.raises(ValueError, match="schedule=dobi"):
        learn_positions(model, {"used": model.used}, Probe(torch.randn(4, 10, 8)), [LayerSpec("used", 8, 8)],
                        10, ScheduleConfig("dobi"))
