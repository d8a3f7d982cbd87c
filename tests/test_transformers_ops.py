"""The two native ops of the transformers integration, each equal to its torch twin bit for bit on
every tier: ``kernels.linear_bf16`` — a bf16 model's BitLinear in one call (bf16 rows in, bf16
rows out: quantise the exact float32 values, packed matmul, one rounding to bfloat16), with and
without bias, row groups, decode and prefill — and ``kernels.rms_norm`` — transformers' RMSNorm
(float32 or bf16, two roundings) with bitlm's norm factor, close to transformers' own module."""

from __future__ import annotations

import pytest
import torch

from bitlm import kernels
from bitlm.kernels import native, reference
from bitlm.packing import pack_weight


def _weight(n, k, fmt, groups, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(groups, generator=g) * 0.05 + 0.001
    return pack_weight(t, s, fmt, groups)


@pytest.mark.parametrize("fmt", ["i2", "t1"])
@pytest.mark.parametrize("m,n,k,groups,bias", [(1, 96, 160, 1, False), (1, 48, 64, 3, True), (7, 80, 250, 5, False),
                                                (33, 64, 320, 4, True)])
def test_native_linear_bf16_equals_the_torch_twin(tier, fmt, m, n, k, groups, bias):
    w = _weight(n, k, fmt, groups, seed=m + n)
    g = torch.Generator().manual_seed(k)
    x = (torch.randn(m, k, generator=g) * 4).to(torch.bfloat16)
    x[0, : k // 3] = 0  # zeros and a large outlier: rounding of the scale and of the output
    x[-1, 1] = 300
    b = torch.randn(n, generator=g) if bias else None
    ref = reference.linear_bf16(x, w, b)
    got = native.linear_bf16(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(kernels.linear_bf16(x, w, b).view(torch.int16), ref.view(torch.int16))
    # the twin is what the three separate calls compute
    q, a = kernels.quantize_rows(x.float())
    assert torch.equal(kernels.matmul(q, a, w, b).to(torch.bfloat16), ref)


def test_output_rounding_is_torchs_for_halfway_and_special_values(tier):
    """A weight of one ternary 1 per row and scale 1: y = float32(q)·(1/a) — values at bf16
    rounding ties, huge and tiny — rounded as torch's .to(bfloat16)."""
    k, n = 16, 16
    w = pack_weight(torch.eye(n, k, dtype=torch.int8), torch.ones(1), "i2")
    x = torch.tensor([[1.0, 127.0, -126.0, 3.0, 0.0, 5.0, -7.0, 9.0, 11.0, 13.0, 15.0, 17.0, 19.0, 21.0, 23.0, 25.0]]
                     ).to(torch.bfloat16)
    ref = reference.linear_bf16(x, w)
    assert torch.equal(native.linear_bf16(x, w).view(torch.int16), ref.view(torch.int16))
    with pytest.raises(TypeError, match="bfloat16"):
        native.linear_bf16(x.float(), w)
    with pytest.raises(ValueError, match="K=16"):
        native.linear_bf16(torch.zeros(1, 32, dtype=torch.bfloat16), w)


def test_leading_dimensions_and_k_slices(tier):
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-1, 2, (32, 128), generator=g, dtype=torch.int8)
    x = torch.randn(2, 3, 128, generator=g).to(torch.bfloat16)
    w = pack_weight(t, torch.tensor([0.02, 0.03]), "i2", 2)
    ref = reference.linear_bf16(x.reshape(6, 128), w).reshape(2, 3, 32)
    assert torch.equal(native.linear_bf16(x, w), ref) and torch.equal(kernels.linear_bf16(x, w), ref)
    sliced = pack_weight(t, torch.tensor([0.02, 0.03, 0.02, 0.03]), "i2", 2, k_groups=2)  # composed path
    q, a = kernels.quantize_rows(x.reshape(6, 128).float())
    assert torch.equal(kernels.linear_bf16(x, sliced), kernels.matmul(q, a, sliced).to(torch.bfloat16).reshape(2, 3, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 2560), (3, 5, 96), (7, 100)])
def test_native_rms_norm_equals_the_torch_twin(tier, dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    ref = reference.rms_norm(x, w, 1e-5)
    got = native.rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, ref) and torch.equal(kernels.rms_norm(x, w, 1e-5), ref)
    with pytest.raises(ValueError, match="weight"):
        native.rms_norm(x, w.double(), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_rms_norm_up_to_the_norm_factor(dtype):
    """transformers' BitNetRMSNorm: the same two roundings; only its float32 mean / rsqrt may make
    ``r`` differ in the last bit, so a float32 row agrees to ~1e-6 and a bf16 value moves by at
    most one bf16 step (rarely)."""
    pytest.importorskip("transformers")
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = BitNetRMSNorm(2560, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(2560, generator=g) + 0.5)
    x = (torch.randn(16, 2560, generator=g) * 2).to(dtype)
    with torch.no_grad():
        ref = norm(x)
    got = kernels.rms_norm(x, norm.weight.detach(), 1e-5)
    assert got.dtype == ref.dtype
    diff = (got.float() - ref.float()).abs()
    if dtype == torch.float32:
        assert float((diff / ref.abs().clamp(min=1e-30)).max()) < 1e-6
    else:
        step = ref.float().abs() * 2.0 ** -7  # one bf16 step (8 significant bits)
        assert bool((diff <= step + 1e-30).all()) and float((diff == 0).float().mean()) > 0.99
