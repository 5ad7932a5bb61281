"""amrc_exp.math.quant: RTN round-trip bounds, hand-computed codes, storage hand counts."""

from __future__ import annotations

import pytest
import torch

from amrc_exp.math.quant import dequantize, fake_quantize, quantize_rtn, quantized_tensor_bytes, stored_bytes


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_within_half_a_step(bits):
    w = torch.randn(7, 33, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, 7)[:, None]
    codes, scale, zero = quantize_rtn(w, bits)
    qmax = 2**bits - 1
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert scale.shape == (7, 1) and zero.shape == (7, 1)
    assert int(codes.min()) >= 0 and int(codes.max()) <= qmax
    w_hat = dequantize(codes, scale, zero)
    assert torch.all((w_hat - w).abs() <= scale / 2 * (1 + 1e-5))
    lo, hi = w.argmin(1), w.argmax(1)
    rows = torch.arange(7)
    assert torch.all(codes[rows, lo] == 0) and torch.all(codes[rows, hi] == qmax)  # full code range used
    torch.testing.assert_close(scale[:, 0], (w.amax(1) - w.amin(1)) / qmax)
    torch.testing.assert_close(fake_quantize(w, bits), w_hat)


def test_hand_example():
    # Row 1: min -1, max 2, 2 bits -> s = 1, z = 1; 0.5 rounds half-to-even to 0 -> code 1.
    # Row 2: min 0, max 0.3 -> s = 0.1, z = 0; 0.14 -> code 1 (w_hat 0.1), 0.26 -> code 3 (0.3).
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 0.14, 0.26, 0.3]])
    codes, scale, zero = quantize_rtn(w, 2)
    assert codes.tolist() == [[0, 1, 1, 3], [0, 1, 3, 3]]
    assert zero[:, 0].tolist() == [1.0, 0.0]
    torch.testing.assert_close(scale[:, 0], torch.tensor([1.0, 0.1]))
    w_hat = dequantize(codes, scale, zero)
    torch.testing.assert_close(w_hat, torch.tensor([[-1.0, 0.0, 0.0, 2.0], [0.0, 0.1, 0.3, 0.3]]))
    # min and max of each row are represented exactly here (min/s is an integer).
    assert w_hat[0, 0] == -1.0 and w_hat[0, 3] == 2.0 and w_hat[1, 0] == 0.0


def test_constant_and_zero_rows_do_not_nan():
    w = torch.tensor([[0.7] * 5, [0.0] * 5, [-3.0] * 5, [1.0, 1.0, 1.0, 1.0, 1.0 + 1e-7]])
    for bits in (2, 4, 8):
        codes, scale, zero = quantize_rtn(w, bits)
        w_hat = dequantize(codes, scale, zero)
        assert torch.isfinite(scale).all() and torch.isfinite(zero).all() and torch.isfinite(w_hat).all()
        assert torch.all((w_hat - w).abs() <= scale / 2 * (1 + 1e-5))
        torch.testing.assert_close(w_hat, w, rtol=1e-5, atol=0)
        assert torch.all(w_hat[1] == 0)


def test_reduce_dim_and_dtype():
    w = torch.randn(6, 4, dtype=torch.float16)
    codes, scale, zero = quantize_rtn(w, 4, dim=0)  # one scale per column
    assert scale.shape == (1, 4)
    assert torch.all(codes[w.float().argmin(0), torch.arange(4)] == 0)
    assert fake_quantize(w, 4).dtype == torch.float16
    with pytest.raises(ValueError):
        quantize_rtn(w, 9)
    with pytest.raises(ValueError):
        quantize_rtn(w, 0)


def test_stored_bytes_hand_count():
    # 10 x 7 at 4 bits: 70 * 0.5 = 35 bytes of codes + 10 channels * (2 + 2) bytes = 75.
    assert quantized_tensor_bytes(70, 10, 4) == 75
    # 3 bits: 210 bits -> 27 bytes (26.25 rounded up) + 40.
    assert quantized_tensor_bytes(70, 10, 3) == 67
    # Two tensors (U^T 10 x 7, V^T 5 x 10) at 8 bits plus 5 fp16 biases and a 3 x 3 fp16 matrix.
    assert stored_bytes([(10, 7), (5, 10)], 8, fp16_numel=5 + 9) == (70 + 40) + (50 + 20) + 2 * 14
    assert stored_bytes([], 4, fp16_numel=100) == 200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    w = torch.randn(5, 9)
    for a, b in zip(quantize_rtn(w, 4), quantize_rtn(w.cuda(), 4)):
        torch.testing.assert_close(b.cpu(), a)
