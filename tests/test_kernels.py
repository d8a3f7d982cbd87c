"""Native kernels against the pure-torch reference, compared with ``torch.equal`` on every tier
this machine supports: the M grid, odd N, K off the block, extremal inputs (int16 saturation
traps), the float epilogue, the fused RMSNorm + quantiser, thread counts, concurrency, fork,
and the backend switch / fallback behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import bitlm.kernels as K
from bitlm import packing as P
from bitlm import quant as Q
from bitlm.kernels import native
from bitlm.kernels import reference as R
from helpers import rand_weight, rand_x

FORMATS = ("i2", "t1", "b1")
NATIVE_REQUIRED = os.environ.get("BITLM_BACKEND", "").lower() == "native"


@pytest.fixture
def lib():
    if native.load() is None:
        if NATIVE_REQUIRED:
            pytest.fail(f"BITLM_BACKEND=native but the library is unavailable: {native.reason()}")
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    return native




# --- integer GEMV / GEMM ----------------------------------------------------------------------

M_GRID = (1, 2, 7, 64, 512)
NK = ((67, 301), (33, 70), (16, 32))  # odd N, K off every block (16, 20, 32); one exact tile


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_grid_bit_identical(tier, fmt):
    for n, k in NK:
        w = rand_weight(fmt, n, k, seed=n * k)
        for m in M_GRID:
            x = rand_x(m, k, seed=m + k)
            got, want = native.gemm(x, w), R.gemm(x, w)
            assert got.dtype == torch.int32 and got.shape == (m, n)
            assert torch.equal(got, want), (tier, fmt, m, n, k)


def _const_weight(fmt: str, n: int, k: int, v: int) -> P.PackedWeight:
    return P.pack_weight(torch.full((n, k), v, dtype=torch.int8), 1.0, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_extremal_inputs(tier, fmt):
    """All +127 x all +1 (and mirrors) over a long K: the int16 paths (vpmaddubsw) must not
    saturate, and the -sum(x) correction must be exact at the extremes."""
    n, k = 35, 2573
    cases = [(127, 1), (-128, -1), (-127, -1), (-128, 1), (127, -1), (0, 1), (0, -1)]
    if fmt != "b1":
        cases.append((-128, 0))
    for xv, wv in cases:
        w = _const_weight(fmt, n, k, wv)
        for m in (1, 3, 13):
            x = torch.full((m, k), xv, dtype=torch.int8)
            got = native.gemm(x, w)
            assert torch.equal(got, torch.full((m, n), xv * wv * k, dtype=torch.int32)), (fmt, xv, wv, m)
            assert torch.equal(got, R.gemm(x, w))
    if fmt != "b1":  # alternating extremes: positive and negative partial sums in one chunk
        t = torch.ones(n, k, dtype=torch.int8)
        t[:, 1::2] = -1
        w = P.pack_weight(t, 1.0, fmt)
        x = torch.full((5, k), 127, dtype=torch.int8)
        x[:, 1::2] = -128
        assert torch.equal(native.gemm(x, w), R.gemm(x, w))


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemv_very_long_k(tier, fmt):
    """K = 41000 (> 2 x 20480): the AVX-512 t1 decode sums 3A - B in segments of 1024 chunks to
    stay exact in int32; extremes and random data across the segment boundaries."""
    n, k = 17, 41000
    for xv, wv in ((127, 1), (-128, 1), (-128, -1)):
        x = torch.full((1, k), xv, dtype=torch.int8)
        assert torch.equal(native.gemm(x, _const_weight(fmt, n, k, wv)), torch.full((1, n), xv * wv * k,
                                                                                     dtype=torch.int32))
    w = rand_weight(fmt, n, k, seed=12)
    x = rand_x(1, k, seed=13)
    assert torch.equal(native.gemm(x, w), R.gemm(x, w))


def test_gemm_all_zero(tier):
    x = torch.zeros(9, 130, dtype=torch.int8)
    for fmt in FORMATS:
        w = rand_weight(fmt, 19, 130, seed=5)
        assert torch.equal(native.gemm(x, w), torch.zeros(9, 19, dtype=torch.int32))
    w0 = _const_weight("i2", 19, 130, 0)
    assert torch.equal(native.gemm(rand_x(9, 130, 1), w0), torch.zeros(9, 19, dtype=torch.int32))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_model_shapes(tier, fmt):
    """The 2B4T shapes (2560 / 6912, K = 6912 is off the t1 block) at decode and prefill M."""
    for n, k in ((2560, 2560), (6912, 2560), (2560, 6912), (640, 2560)):
        w = rand_weight(fmt, n, k, seed=n + k)
        for m in (1, 5, 128):
            if tier == "generic" and m == 128:
                continue
            x = rand_x(m, k, seed=m)
            assert torch.equal(native.gemm(x, w), R.gemm(x, w)), (fmt, n, k, m)


# --- float epilogue ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_epilogue_bit_identical(tier, fmt):
    gen = torch.Generator().manual_seed(2)
    for n, k, groups in ((66, 45, 3), (67, 301, 1), (32, 64, 2)):  # 22-row groups straddle tiles
        w = rand_weight(fmt, n, k, seed=n, groups=groups)
        bias = torch.randn(n, generator=gen)
        for m in (1, 5, 64):
            x = rand_x(m, k, seed=m)
            a = torch.rand(m, generator=gen) * 50 + 0.1
            for b in (None, bias):
                got, want = native.matmul(x, a, w, b), R.matmul(x, a, w, b)
                assert got.dtype == torch.float32 and torch.equal(got, want), (fmt, n, groups, m, b is None)


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_m_gemm_bit_identical(tier, fmt):
    """M = 2..9 (serving's batched decode): M <= 8 runs as one M-token register block with the
    weight prefetch (BITLM_GEMM_SMALL_M), 9 on the large-M loop; both equal the reference, with
    the float epilogue, weight groups straddling tiles, a bias, and odd tile counts."""
    gen = torch.Generator().manual_seed(3)
    for n, k, groups in ((66, 301, 3), (48, 700, 1), (16, 40, 1)):
        w = rand_weight(fmt, n, k, seed=n + k, groups=groups)
        bias = torch.randn(n, generator=gen)
        for m in range(2, 10):
            x = rand_x(m, k, seed=m * k)
            a = torch.rand(m, generator=gen) * 50 + 0.1
            assert torch.equal(native.gemm(x, w), R.gemm(x, w)), (tier, fmt, m, n, k)
            got, want = native.matmul(x, a, w, bias), R.matmul(x, a, w, bias)
            assert torch.equal(got, want), (tier, fmt, m, n, k, groups)


def test_gemm_paths_and_blocking_agree_across_processes(lib):
    """The same products with the small-M path off, a tiny activation block (many outer blocks
    in the large-M loop), the large-M loop reading codes unpacked once per activation block for
    every format or for none, the GEMV with one, two and four streams (and the low-bit heads' decode
    with one or two), other prefetch distances and levels, and the i2 GEMV's shifting unpack, read
    once at start-up from BITLM_GEMM_SMALL_M / BITLM_GEMM_XBLOCK / BITLM_GEMM_CODES /
    BITLM_GEMV_STREAMS / BITLM_GEMV_PREFETCH / BITLM_GEMV_PREFETCH_L2 / BITLM_GEMV_I2_SHIFT, and the W8A8
    head's decode one row or four rows at a time (BITLM_HEAD_ROWS / BITLM_HEAD_PREFETCH /
    BITLM_HEAD_PREFETCH_L2), give the same bits as this process's defaults, on every tier; and
    bitlm_kernel_config reports the choices."""
    code = ("import sys, torch; from bitlm.kernels import native; from bitlm import packing as P\n"
            "g = torch.Generator().manual_seed(5); outs = []\n"
            "for t in native.supported_tiers():\n"
            "    native.set_tier(t)\n"
            "    for fmt in ('i2', 't1', 'b1'):\n"
            "        al = torch.tensor(P.get_format(fmt).alphabet, dtype=torch.int8)\n"
            "        w = P.pack_weight(al[torch.randint(len(al), (131, 333), generator=g)], 0.5, fmt)\n"
            "        for m in (1, 3, 8, 40):\n"
            "            outs.append(native.gemm(torch.randint(-128, 128, (m, 333), generator=g, dtype=torch.int8), w))\n"
            "    for bits in (4, 6):  # the low-bit heads' decode reads two tiles at once where the plan has streams\n"
            "        data, scale = P.pack_head(torch.randn(131, 333, generator=g) * 0.05, bits)\n"
            "        xq, a = native.quantize_rows(torch.randn(1, 333, generator=g) * 3)\n"
            "        outs.append(native.dense_lowbit_matmul(xq, a, data, scale, bits, 131))\n"
            "    wi = torch.randint(-127, 128, (131, 333), generator=g, dtype=torch.int8)  # the W8A8 head, decode and M = 3\n"
            "    for m in (1, 3):\n"
            "        xq, a = native.quantize_rows(torch.randn(m, 333, generator=g) * 3)\n"
            "        outs.append(native.dense_int8a8_matmul(xq, a, wi, torch.rand(131, generator=g) + 0.5))\n"
            "torch.save(outs, sys.argv[1]); print(native.info()['kernel_config'])\n")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = {}
        for name, extra in (("default", {}), ("off", {"BITLM_GEMM_SMALL_M": "0", "BITLM_GEMM_XBLOCK": "4096",
                                                       "BITLM_GEMV_STREAMS": "2", "BITLM_GEMV_I2_SHIFT": "1",
                                                       "BITLM_GEMV_PREFETCH": "64", "BITLM_GEMV_PREFETCH_L2": "1",
                                                       "BITLM_GEMM_CODES": "1", "BITLM_HEAD_ROWS": "4"}),
                            ("one", {"BITLM_GEMV_STREAMS": "1", "BITLM_GEMV_PREFETCH_L2": "0", "BITLM_GEMM_CODES": "0",
                                     "BITLM_HEAD_ROWS": "1", "BITLM_HEAD_PREFETCH": "200",
                                     "BITLM_HEAD_PREFETCH_L2": "0"}),
                            ("four", {"BITLM_GEMV_STREAMS": "4", "BITLM_GEMV_PREFETCH": "3k"})):
            env = {k: v for k, v in os.environ.items() if not k.startswith(("BITLM_GEMM_", "BITLM_GEMV_"))}
            env.update(extra)
            out = subprocess.run([sys.executable, "-c", code, f"{d}/{name}.pt"], env=env, capture_output=True,
                                 text=True, check=True)
            res[name] = (torch.load(f"{d}/{name}.pt"), out.stdout.strip())
    assert "small_m_max=8" in res["default"][1] and "small_m_max=0" in res["off"][1]
    assert "gemm_x_block=4K" in res["off"][1] and "family=" in res["off"][1]
    assert "gemm_codes=i2+t1+b1" in res["off"][1] and "gemm_codes=none" in res["one"][1]
    assert "head=rows4" in res["off"][1] and "head=rows1/200/l1" in res["one"][1]
    assert "gemv=i2:2x64/l2,t1:2x64/l2,b1:2x64/l2" in res["off"][1] and "gemv_i2=shift" in res["off"][1]
    assert "gemv=i2:1x" in res["one"][1] and "t1:1x" in res["one"][1] and "/l2" not in res["one"][1]
    assert "gemv=i2:4x3072/" in res["four"][1] and "t1:2x3072/" in res["four"][1] and "gemv_i2=mask" in res["one"][1]
    assert len(res["default"][0]) == len(res["off"][0]) == len(res["one"][0]) == len(res["four"][0]) > 0
    for a, b, c, d in zip(res["default"][0], res["off"][0], res["one"][0], res["four"][0]):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def test_linear_native_equals_reference(tier, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 130, generator=gen)
    nw = torch.rand(130, generator=gen) + 0.5
    for fmt in FORMATS:
        w = rand_weight(fmt, 41, 130, seed=9, groups=1)
        for kwargs in ({}, {"norm_weight": nw}, {"rmsnorm": True}):
            monkeypatch.setenv("BITLM_BACKEND", "native")
            got = K.linear(x, w, **kwargs)
            monkeypatch.setenv("BITLM_BACKEND", "reference")
            want = K.linear(x, w, **kwargs)
            assert got.shape == (2, 3, 41)
            assert torch.equal(got, want), (fmt, kwargs)
            q, a = R.quantize_rows(x.reshape(6, 130), **kwargs)  # what linear composes
            assert torch.equal(want, R.matmul(q, a, w).reshape(2, 3, 41)), (fmt, kwargs)


# --- fused RMSNorm + quantiser -----------------------------------------------------------------


def _rows(m: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 3, m).reshape(m, 1)
    if k > 3:
        x[:, 3] *= 40  # an outlier feature, as in real activations
    if m > 2:
        x[1] = 0.0  # max|x| = 0 -> the 1e-5 clamp
        x[2] = 3e-7  # tiny row: clamp region
    return x


@pytest.mark.parametrize("k", (1, 15, 16, 17, 333, 2560))
def test_quantize_rows_bit_identical(tier, k):
    gen = torch.Generator().manual_seed(k)
    nw = torch.rand(k, generator=gen) * 2
    for m in (1, 7, 64):
        x = _rows(m, k, seed=m * k)
        for args, kw in (((), {}), ((nw,), {}), ((), {"rmsnorm": True}), ((nw, 1e-6), {})):
            q1, a1 = native.quantize_rows(x, *args, **kw)
            q2, a2 = R.quantize_rows(x, *args, **kw)
            assert q1.dtype == torch.int8 and a1.dtype == torch.float32 and a1.shape == (m,)
            assert torch.equal(q1, q2) and torch.equal(a1, a2), (tier, k, m, args, kw)


def test_quantize_rows_without_norm_is_quant_activation_quantize(tier):
    x = _rows(33, 257, seed=1)
    q, a = native.quantize_rows(x)
    qq, aa = Q.activation_quantize(x)
    assert torch.equal(q, qq.to(torch.int8)) and torch.equal(a, aa.reshape(-1))


def test_quantize_rows_ties_round_half_even(tier):
    # max|x| = 127 -> a = 1: x * a lands exactly on .5 ties
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])
    q, a = native.quantize_rows(x)
    assert a.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


def test_rms_sumsq_order_is_the_documented_loop():
    """reference.rms_sumsq (vectorised with cumsum) == the literal 16-lane loop in float64."""
    for m, k in ((3, 1), (2, 17), (4, 333)):
        x = _rows(m, k, seed=k)
        got = R.rms_sumsq(x)
        for i in range(m):
            lane = [0.0] * 16
            for j, v in enumerate(x[i].tolist()):
                lane[j % 16] += v * v
            for step in (8, 4, 2, 1):
                for j in range(step):
                    lane[j] += lane[j + step]
            assert got[i].item() == lane[0]


def test_reference_rmsnorm_close_to_quant_group_rms_norm():
    x = torch.randn(16, 320)
    nw = torch.rand(320) + 0.5
    r = torch.sqrt(R.rms_sumsq(x) / 320 + 1e-5).reciprocal().float().unsqueeze(1)
    torch.testing.assert_close(x * r * nw, Q.group_rms_norm(x, 1, 1e-5) * nw, rtol=1e-6, atol=1e-6)


# --- threads, concurrency, fork -----------------------------------------------------------------


def test_thread_counts_give_identical_results(lib):
    prev = native.num_threads()
    try:
        for fmt in FORMATS:
            w = rand_weight(fmt, 517, 1000, seed=3, groups=11)
            for m in (1, 33):
                x = rand_x(m, 1000, seed=m)
                a = torch.rand(m) + 0.5
                outs = []
                for th in (1, 2, 3):
                    native.set_num_threads(th)
                    outs.append((native.gemm(x, w), native.matmul(x, a, w)))
                for g, f in outs[1:]:
                    assert torch.equal(g, outs[0][0]) and torch.equal(f, outs[0][1]), (fmt, m)
        with pytest.raises(ValueError):
            native.set_num_threads(0)
    finally:
        native.set_num_threads(prev)


def test_concurrent_callers_are_safe(lib):
    """Two Python threads in the library at once (ctypes drops the GIL): the second runs inline
    instead of sharing the pool; both results stay exact."""
    w = rand_weight("i2", 300, 700, seed=1)
    xs = [rand_x(m, 700, seed=m) for m in (1, 9, 1, 17)]
    want = [R.gemm(x, w) for x in xs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(20):
            for x, ref in zip(xs, want):
                if not torch.equal(native.gemm(x, w), ref):
                    errors.append(f"thread {i}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_pool_survives_fork(lib):
    native.set_num_threads(2)
    w = rand_weight("t1", 200, 400, seed=2)
    x = rand_x(4, 400, seed=4)
    want = R.gemm(x, w)
    assert torch.equal(native.gemm(x, w), want)  # pool workers now exist in the parent
    pid = os.fork()
    if pid == 0:  # child: its pool has no threads until it makes new ones
        ok = all(torch.equal(native.gemm(x, w), want) for _ in range(5))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


# --- API errors ----------------------------------------------------------------------------------


def test_native_rejects_bad_arguments(lib):
    w = rand_weight("i2", 20, 40, seed=1)
    with pytest.raises(ValueError, match="K=41"):
        native.gemm(rand_x(2, 41, 0), w)
    with pytest.raises(TypeError, match="int8"):
        native.gemm(torch.zeros(2, 40), w)
    with pytest.raises(ValueError, match="no native kernel"):
        native.gemm(rand_x(2, 40, 0), w.to_format("hf"))
    broken = P.pack_weight(torch.zeros(20, 40, dtype=torch.int8), 1.0, "i2")
    broken.data = broken.data[:, :64]  # mutated after validation: must not reach C
    with pytest.raises(ValueError, match="packed data"):
        native.gemm(rand_x(2, 40, 0), broken)
    with pytest.raises(ValueError, match="unknown tier"):
        native.set_tier("sse9")


def test_hf_format_runs_on_reference_path():
    w = rand_weight("i2", 21, 50, seed=8)
    x = rand_x(3, 50, seed=3)
    assert torch.equal(K.gemm(x, w.to_format("hf")), R.gemm(x, w))


# --- backend selection and fallback -------------------------------------------------------------


def test_backend_reference_is_forceable(monkeypatch):
    monkeypatch.setenv("BITLM_BACKEND", "reference")
    assert K.backend() == "reference"
    info = K.backend_info()
    assert info["backend"] == "reference" and "BITLM_BACKEND" in info["reason"]
    w = rand_weight("b1", 23, 77, seed=1)
    x = rand_x(4, 77, seed=2)
    assert torch.equal(K.gemm(x, w), R.gemm(x, w))


def test_backend_info_is_informative(lib, monkeypatch):
    monkeypatch.delenv("BITLM_BACKEND", raising=False)
    info = K.backend_info()
    assert info["backend"] == "native"
    assert info["tier"] in native.TIERS and info["threads"] >= 1
    for key in ("reason", "cpu_flags", "supported_tiers", "library", "build", "abi"):
        assert key in info


def test_missing_library_falls_back_or_raises(monkeypatch):
    monkeypatch.setenv("BITLM_KERNELS_LIB", "/nonexistent/libbitlm.so")
    native.reset()
    monkeypatch.setattr(K, "_warned", False)
    try:
        w = rand_weight("i2", 17, 33, seed=1)
        x = rand_x(2, 33, seed=1)
        monkeypatch.setenv("BITLM_BACKEND", "native")
        with pytest.raises(RuntimeError, match="not found"):
            K.gemm(x, w)
        assert K.backend_info()["backend"] == "reference" and "not found" in K.backend_info()["reason"]
        monkeypatch.setenv("BITLM_BACKEND", "auto")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = K.gemm(x, w)
            K.gemm(x, w)
        assert torch.equal(got, R.gemm(x, w))
        assert len([c for c in caught if "native kernels unavailable" in str(c.message)]) == 1  # once
    finally:
        monkeypatch.delenv("BITLM_KERNELS_LIB")
        native.reset()


def test_env_forces_tier_and_threads(lib):
    """BITLM_KERNEL_TIER / BITLM_NUM_THREADS are read once when the library initialises, so
    check them in fresh interpreters."""
    code = ("from bitlm.kernels import native; i = native.info(); "
            "print(i['tier'], i['threads'], i['tier_note'], sep='|')")
    for want in native.supported_tiers() + ["bogus"]:
        env = dict(os.environ, BITLM_KERNEL_TIER=want, BITLM_NUM_THREADS="3")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        tier, threads, note = out.stdout.strip().split("|")
        assert threads == "3"
        if want == "bogus":
            assert tier == native.info()["best_tier"] and "not understood" in note
        else:
            assert tier == want and "forced" in note


# --- dense int8 head ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", (1, 15, 16, 33, 300, 2560))
def test_dense_int8_matmul_bit_identical(tier, k):
    gen = torch.Generator().manual_seed(k)
    for m, n in ((1, 37), (3, 70), (9, 5), (64, 67)):
        x = torch.randn(m, k, generator=gen) * 3
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        w[0] = -128  # extremes
        s = torch.rand(n, generator=gen) / 64
        got, want = native.dense_int8_matmul(x, w, s), R.dense_int8_matmul(x, w, s)
        assert got.shape == (m, n) and torch.equal(got, want), (tier, m, n, k)


def test_dense_int8_matmul_close_to_float_linear(lib):
    x = torch.randn(2, 5, 300)
    w = torch.randint(-128, 128, (70, 300), dtype=torch.int8)
    s = torch.rand(70) / 100
    got = K.dense_int8_matmul(x, w, s)
    assert got.shape == (2, 5, 70)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w.float()) * s, rtol=1e-5, atol=1e-5)


# --- dense bf16 head ------------------------------------------------------------------------------


def _bf16_rows(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = (torch.randn(n, k, generator=gen) * 0.5).to(torch.bfloat16)
    bits = w.view(torch.int16)
    bits[0, ::3] = 0x0001  # smallest subnormal bf16
    bits[0, 1::3] = -0x8000  # -0.0
    if n > 1:
        w[1] = 1e20  # large, finite products
    return w


@pytest.mark.parametrize("k", (1, 15, 16, 17, 33, 100, 300, 2560))
def test_dense_bf16_matmul_bit_identical(tier, k):
    gen = torch.Generator().manual_seed(1000 + k)
    for m, n in ((1, 1), (1, 37), (3, 70), (1, 261), (3, 5), (9, 67)):
        x = torch.randn(m, k, generator=gen) * 3
        w = _bf16_rows(n, k, gen)
        got, want = native.dense_bf16_matmul(x, w), R.dense_bf16_matmul(x, w)
        assert got.dtype == torch.float32 and got.shape == (m, n), (tier, m, n, k)
        assert torch.equal(got, want), (tier, m, n, k, (got - want).abs().max().item())


def test_dense_bf16_reference_is_the_lane_loop():
    """The torch reference against the definition written out as scalar float32 loops."""
    import numpy as np

    gen = torch.Generator().manual_seed(7)
    for k in (1, 15, 16, 17, 50):
        x = torch.randn(2, k, generator=gen)
        w = torch.randn(3, k, generator=gen).to(torch.bfloat16)
        xs, ws = x.numpy(), w.float().numpy()
        want = np.zeros((2, 3), dtype=np.float32)
        for m in range(2):
            for n in range(3):
                lane = np.zeros(16, dtype=np.float32)
                for kk in range(k):
                    lane[kk % 16] = np.float32(lane[kk % 16] + np.float32(xs[m, kk] * ws[n, kk]))
                for h in (8, 4, 2, 1):
                    lane[:h] = lane[:h] + lane[h : 2 * h]
                want[m, n] = lane[0]
        assert torch.equal(R.dense_bf16_matmul(x, w), torch.from_numpy(want)), k


def test_dense_bf16_matmul_close_to_float_linear(lib):
    x = torch.randn(2, 5, 300)
    w = torch.randn(70, 300).to(torch.bfloat16)
    got = K.dense_bf16_matmul(x, w)
    assert got.shape == (2, 5, 70) and got.dtype == torch.float32
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w.float()), rtol=1e-5, atol=1e-4)
    # float32 rounding only: within the worst-case summation error bound of the exact product
    exact = torch.nn.functional.linear(x.double(), w.double())
    bound = 300 * 2.0**-24 * torch.nn.functional.linear(x.double().abs(), w.double().abs())
    assert ((got.double() - exact).abs() <= bound).all()
    # a non-contiguous weight and a bf16 x (converted exactly) give the same numbers
    wt = torch.randn(300, 70).to(torch.bfloat16).t()
    xb = x.to(torch.bfloat16)
    assert torch.equal(K.dense_bf16_matmul(xb, wt), K.dense_bf16_matmul(xb.float(), wt.contiguous()))


@pytest.mark.parametrize("impl", ("native", "reference"))
def test_dense_bf16_matmul_bad_input(impl):
    if impl == "native" and native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    f = native.dense_bf16_matmul if impl == "native" else R.dense_bf16_matmul
    x = torch.randn(2, 40)
    with pytest.raises(TypeError, match="bfloat16"):
        f(x, torch.randn(8, 40))  # float32 weight
    with pytest.raises(TypeError, match="bfloat16"):
        f(x, torch.randint(-5, 5, (8, 40), dtype=torch.int8))
    with pytest.raises(TypeError, match="bfloat16"):
        f(x, torch.randn(40).to(torch.bfloat16))  # not (N, K)
    with pytest.raises(ValueError, match="K=40"):
        f(x, torch.randn(8, 41).to(torch.bfloat16))


# --- W8A8 head (int8 activations x int8 rows) -----------------------------------------------------


@pytest.mark.parametrize("k", (1, 15, 63, 64, 65, 300, 2560))
def test_dense_int8a8_matmul_bit_identical(tier, k):
    gen = torch.Generator().manual_seed(k)
    # (1, 131): decode's 8-row blocks over two panels and a tail; (8, 200): next-panel prefetch
    for m, n in ((1, 37), (1, 131), (2, 5), (3, 70), (4, 9), (7, 67), (8, 200), (64, 67)):
        xq, a = native.quantize_rows(torch.randn(m, k, generator=gen) * 3)
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        w[0] = -128  # extremes: -128 * -128 and the +128 bias of the u8 trick
        s = torch.rand(n, generator=gen) / 64
        got, want = native.dense_int8a8_matmul(xq, a, w, s), R.dense_int8a8_matmul(xq, a, w, s)
        assert got.shape == (m, n) and torch.equal(got, want), (tier, m, n, k)


def test_glu_relu2_bit_identical(tier):
    """The ReLU² gated activation: native == torch's relu(g).square_().mul_(u), NaN / inf / -0 included."""
    gen = torch.Generator().manual_seed(3)
    for m, f in ((1, 1), (3, 17), (8, 6912), (97, 6912)):  # the last one on the thread pool
        y = torch.randn(m, 2 * f, generator=gen) * 4
        y[0, 0] = -0.0
        if f > 2:
            y[0, 1], y[0, 2], y[-1, f] = float("nan"), float("inf"), float("-inf")
        want = R.glu_relu2(y)
        prev = native.num_threads()
        try:
            for threads in (1, 2):
                native.set_num_threads(threads)
                got = native.glu_relu2(y)
                assert got.shape == (m, f) and torch.equal(got.isnan(), want.isnan())
                assert torch.equal(got.nan_to_num(), want.nan_to_num()), (tier, m, f, threads)
        finally:
            native.set_num_threads(prev)
    with pytest.raises(ValueError, match="gate and up"):
        native.glu_relu2(torch.zeros(2, 5))


def test_argmax_is_torchs_indices(tier):
    """The greedy pick (bitlm_argmax_f32): torch's max(-1).indices on rows of every length class
    (under one vector, whole vectors, a tail), tied maxima (the first wins; -0.0 ties 0.0), a NaN
    anywhere (the first NaN wins), all -inf; 2-D rows one by one; non-float32 input to torch."""
    from bitlm import kernels

    gen = torch.Generator().manual_seed(4)
    for n in (1, 5, 16, 17, 48, 1000, 128256):
        for case in range(12):
            x = torch.randint(-3, 4, (n,), generator=gen).float()  # many ties
            if case % 4 == 1:
                x[torch.randint(0, n, (2,), generator=gen)] = float("nan")
            if case == 2:
                x[:] = float("-inf")
            if case == 3:
                x = x * 0.0  # -0.0 and 0.0
            if case == 5:
                x[-1] = 10.0  # the maximum in the tail
            assert native.argmax(x).item() == x.max(-1).indices.item(), (tier, n, case)
    rows = torch.randint(-2, 3, (3, 300), generator=gen).float()
    rows[1, 7] = float("nan")
    assert torch.equal(native.argmax(rows), rows.max(-1).indices)
    assert torch.equal(kernels.argmax(rows), rows.max(-1).indices)
    assert torch.equal(native.argmax(rows.double()), rows.max(-1).indices)


def test_dense_int8a8_extremal_sums_are_exact(tier):
    """The largest |sum| the int32 path allows (K = 131071, all -128 x -128 = 2^31 - 16384) and
    mixed signs: no 16-bit saturation, no int32 overflow, on every tier."""
    k = 131071
    for xv, wv in ((-128, -128), (127, 127), (-128, 127), (127, -128)):
        xq = torch.full((2, k), xv, dtype=torch.int8)
        a, s = torch.ones(2), torch.ones(3)
        w = torch.full((3, k), wv, dtype=torch.int8)
        got = native.dense_int8a8_matmul(xq, a, w, s)
        assert torch.equal(got, R.dense_int8a8_matmul(xq, a, w, s)), (tier, xv, wv)
        assert got[0, 0].item() == float(torch.tensor(k * xv * wv, dtype=torch.int64).to(torch.float32))


def test_dense_int8a8_is_the_bitlinear_epilogue(lib):
    """acc · (scale / a) on the exact integer product, and close to the float head it stands for."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 300, generator=gen)
    w = torch.randint(-128, 128, (70, 300), generator=gen, dtype=torch.int8)
    s = torch.rand(70, generator=gen) / 100
    xq, a = K.quantize_rows(x)
    acc = (xq.long() @ w.long().t()).to(torch.float32)
    want = acc * (s.reshape(1, -1) / a.reshape(-1, 1))
    assert torch.equal(K.dense_int8a8_matmul(xq, a, w, s), want)
    ref = torch.nn.functional.linear(x, w.float()) * s
    assert ((want - ref).norm() / ref.norm()).item() < 0.02  # 8-bit activation rounding only


@pytest.mark.parametrize("impl", ("native", "reference"))
def test_dense_int8a8_bad_input(impl):
    if impl == "native" and native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    f = native.dense_int8a8_matmul if impl == "native" else R.dense_int8a8_matmul
    xq, a = torch.zeros(2, 40, dtype=torch.int8), torch.ones(2)
    w, s = torch.zeros(8, 40, dtype=torch.int8), torch.ones(8)
    with pytest.raises(TypeError, match="int8"):
        f(xq.float(), a, w, s)  # activations not quantised
    with pytest.raises(TypeError, match="int8"):
        f(xq, a, w.float(), s)
    with pytest.raises(ValueError, match="K=40"):
        f(xq, a, torch.zeros(8, 41, dtype=torch.int8), s)
    with pytest.raises(ValueError, match="K < 131072"):
        f(torch.zeros(1, 131072, dtype=torch.int8), torch.ones(1), torch.zeros(1, 131072, dtype=torch.int8), s[:1])
    if impl == "native":
        with pytest.raises(ValueError, match="scale"):
            f(xq, a, w, torch.ones(7))
        with pytest.raises(ValueError, match="a has"):
            f(xq, torch.ones(3), w, s)


def test_benchmarks_name_the_cpu_precisely(lib):
    """benchmarks/cpu_info.py: (vendor, family, model) -> microarchitecture for the parts the
    project has run on, a virtual CPU whose flags outrun its model called out, and the record
    every benchmark JSON carries (with the library's kernel choices)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import cpu_info
    finally:
        sys.path.pop(0)
    ua = cpu_info.microarchitecture
    assert ua("AuthenticAMD", 25, 17) == "Zen 4" and ua("AuthenticAMD", 26, 2) == "Zen 5"
    assert ua("AuthenticAMD", 25, 1) == "Zen 3" and ua("GenuineIntel", 6, 143) == "Sapphire Rapids"
    assert ua("GenuineIntel", 6, 167) == "Rocket Lake" and ua("GenuineIntel", 6, 1) == "unknown"
    assert ua("GenuineIntel", 6, 167, {"amx_tile"}).startswith("Sapphire Rapids or later")
    rec = cpu_info.cpu_identity()
    for key in ("vendor", "family", "model", "stepping", "microarchitecture", "flags", "kernel_tier", "kernel_config"):
        assert key in rec, key
    assert f"family={rec['family']} model={rec['model']}" in rec["kernel_config"]  # cpuid agrees with /proc
    assert "family" in cpu_info.describe(rec)


def test_rope_rows_bit_identical():
    """RoPE on (M, H, D) rows: the native op == the torch twin == bitlm.model.apply_rope (the
    training model's formula) bit for bit, NaN / inf / -0 included, at 1 and 2 threads."""
    from bitlm.model import apply_rope, rope_cos_sin

    gen = torch.Generator().manual_seed(4)
    for m, h, d in ((1, 1, 2), (5, 3, 8), (97, 20, 128)):
        cos, sin = rope_cos_sin(torch.arange(7, 7 + m), d, 500000.0)
        x = torch.randn(m, h, d, generator=gen) * 3
        x[0, 0, 0] = -0.0
        if d > 2:
            x[0, 0, 1], x[-1, -1, 2], x[-1, 0, d - 1] = float("nan"), float("inf"), float("-inf")
        model = apply_rope(x.transpose(0, 1)[None], cos, sin)[0].transpose(0, 1)  # (1, H, T, D) layout
        ref = R.rope_rows_(x.clone(), cos, sin)
        assert torch.equal(ref.nan_to_num(), model.nan_to_num()) and torch.equal(ref.isnan(), model.isnan())
        prev = native.num_threads()
        try:
            for threads in (1, 2):
                native.set_num_threads(threads)
                got = x.clone()
                assert native.rope_rows_(got, cos, sin) is got
                assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.nan_to_num(), ref.nan_to_num()), (m, h, d)
        finally:
            native.set_num_threads(prev)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.rope_rows_(torch.zeros(4, 2, 8).transpose(0, 1), torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="cos / sin must be"):
        native.rope_rows_(torch.zeros(4, 2, 8), torch.zeros(3, 8), torch.zeros(4, 8))
