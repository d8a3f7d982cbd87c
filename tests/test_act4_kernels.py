"""The Hadamard transform op (BitNet v2's H-BitLinear) and the 4-bit absmean activations in the
kernels: native == reference bit for bit on every tier and thread count; int4 codes through the
int8 × ternary GEMM give the exact int4 × ternary sums."""

from __future__ import annotations

import os

import pytest
import torch

import bitlm.kernels as K
from bitlm import packing as P
from bitlm import quant as Q
from bitlm.kernels import native
from bitlm.kernels import reference as R

NATIVE_REQUIRED = os.environ.get("BITLM_BACKEND", "").lower() == "native"


def _tiers() -> list[str]:
    if native.load() is None:
        return ["unavailable"]
    return native.supported_tiers()


@pytest.fixture(params=_tiers())
def tier(request):
    if request.param == "unavailable":
        if NATIVE_REQUIRED:
            pytest.fail(f"BITLM_BACKEND=native but the library is unavailable: {native.reason()}")
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    prev = native.tier()
    native.set_tier(request.param)
    yield request.param
    native.set_tier(prev)


@pytest.mark.parametrize("k", [1, 2, 3, 8, 16, 24, 64, 160, 192, 1024, 2560, 6912])
def test_hadamard_native_bit_identical(tier, k):
    torch.manual_seed(k)
    for m in (1, 3, 17):
        x = torch.randn(m, k) * torch.logspace(-3, 3, k)  # mixed magnitudes: rounding differs by order
        want = R.hadamard(x)
        got = native.hadamard(x)
        assert torch.equal(got, want), (tier, k, m)
    assert torch.equal(R.hadamard(x), Q.hadamard_transform(x))


def test_hadamard_native_threads_and_shapes(tier):
    torch.manual_seed(0)
    x = torch.randn(2, 33, 256)
    want = R.hadamard(x)
    prev = native.num_threads()
    try:
        for t in (1, 2, 3):
            native.set_num_threads(t)
            assert torch.equal(native.hadamard(x), want), t
    finally:
        native.set_num_threads(prev)
    assert torch.equal(K.hadamard(x), want)
    assert native.hadamard(x[:, :, ::2]).shape == (2, 33, 128)  # non-contiguous input is copied
    with pytest.raises(ValueError, match="non-empty"):
        native.hadamard(torch.zeros(2, 0))
    assert native.load().bitlm_hadamard_f32(None, 1, 8, None) == -1  # EINVAL from C


def test_hadamard_scale_is_the_same_float():
    lib = native.load()
    if lib is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    import ctypes

    lib.bitlm_hadamard_scale.restype = ctypes.c_float
    lib.bitlm_hadamard_scale.argtypes = [ctypes.c_int64]
    for b in (1, 2, 8, 32, 512, 4096):
        assert lib.bitlm_hadamard_scale(b) == Q.hadamard_scale(b)


@pytest.mark.parametrize("fmt", ["i2", "t1"])
def test_int4_codes_through_the_int8_gemm_are_exact(tier, fmt):
    torch.manual_seed(1)
    x = torch.randn(5, 96) * 3
    q, a = R.quantize_rows_absmean(x)
    assert q.dtype == torch.int8 and q.min() >= -8 and q.max() <= 7
    qq, aa = Q.activation_quantize_absmean(x)
    assert torch.equal(q.float(), qq) and torch.equal(a, aa)
    w = torch.randn(40, 96)
    t, s = Q.ternary_quantize(w)
    pw = P.pack_weight(t, s, fmt)
    exact = (q.long() @ t.long().t()).to(torch.int32)  # int4 × ternary in integers
    assert torch.equal(R.gemm(q, pw), exact)
    assert torch.equal(native.gemm(q, pw), exact)
