"""The AMX int8 tile GEMM (csrc/x86_amx.c, M >= 2 on the avx512 tier) against the pure-torch
reference and against the VNNI kernels it replaces, compared with ``torch.equal``: i2 / t1 / b1,
M across one and two token tiles (partial tiles, the small-M ring and the large-M scratch), N off
the 16-row tile, K off 64 (the padded activation copy), weight groups and a bias in the float
epilogue, one and two threads; ``BITLM_AMX=0`` vs on in subprocesses (the switch is read once per
process) gives the same bytes; and on a CPU with AMX the library must have been built with it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from bitlm import packing as P
from bitlm.kernels import native
from bitlm.kernels import reference as R
from helpers import rand_weight, rand_x

FORMATS = ("i2", "t1", "b1")
NO_AMX = "this CPU has no AMX (amx_tile/amx_int8)"


def _cpu_has_amx() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return {"amx_tile", "amx_int8"} <= flags
    return False


HAVE_AMX = _cpu_has_amx()


def _compiler_has_amx() -> bool:
    cc = os.environ.get("CC", "gcc")
    try:
        probe = subprocess.run([cc, "-mamx-tile", "-mamx-int8", "-x", "c", "-E", "-", "-o", os.devnull],
                               input="#include <immintrin.h>\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def _require_amx_library() -> str:
    """Skip where AMX cannot run (no AMX in the CPU, the OS refused the tile state); FAIL where it
    could but the library lacks it (x86_amx.c did not build with a compiler that supports it).
    Returns the kernel_config string."""
    if not HAVE_AMX:
        pytest.skip(NO_AMX)
    if native.load() is None:
        pytest.fail(f"this CPU has AMX but the native kernels are unavailable: {native.reason()}")
    cfg = native.info()["kernel_config"]
    note = cfg[cfg.index("amx="):] if "amx=" in cfg else ""
    assert note, f"kernel_config does not report amx=: {cfg}"
    if "not built" in note:
        if _compiler_has_amx():
            pytest.fail(f"the compiler supports AMX but the library was built without it: {note}")
        pytest.skip(f"the compiler lacks -mamx-tile/-mamx-int8 ({note})")
    if "refused" in note or "cpu/os" in note:
        pytest.skip(f"AMX unavailable to this process: {note}")
    return cfg


@pytest.fixture
def amx():
    """The native library with the AMX GEMM on in this process (the avx512 tier active)."""
    cfg = _require_amx_library()
    if os.environ.get("BITLM_AMX", "") in ("0", "off", "no", "false"):
        pytest.skip("BITLM_AMX=0 in the environment")
    assert "amx=on" in cfg, cfg
    prev = native.tier()
    native.set_tier("avx512")
    yield native
    native.set_tier(prev)




M_AMX = (2, 3, 8, 16, 17, 33, 64)
# N: one tile, odd tile counts, N off 16; K: below one B tile, off 64 (t1's Kp > the 64-rounding at
# 61), exactly 64 / 2 B tiles, off every block, > one unpack ring batch (80 quads = 320 k)
NK_AMX = ((16, 64), (67, 301), (33, 61), (130, 128), (48, 700), (17, 5))


@pytest.mark.parametrize("fmt", FORMATS)
def test_amx_gemm_equals_reference_and_vnni(amx, fmt):
    for n, k in NK_AMX:
        w = rand_weight(fmt, n, k, seed=n * k + 1)
        for m in M_AMX:
            x = rand_x(m, k, seed=m + 7 * k)
            want = R.gemm(x, w)
            got = native.gemm(x, w)
            assert got.dtype == torch.int32 and torch.equal(got, want), (fmt, m, n, k)
            native.set_tier("avx2")  # the same product without AMX (AMX runs on avx512 only)
            try:
                assert torch.equal(native.gemm(x, w), want), (fmt, m, n, k, "avx2")
            finally:
                native.set_tier("avx512")


@pytest.mark.parametrize("fmt", FORMATS)
def test_amx_matmul_epilogue_equals_reference(amx, fmt):
    gen = torch.Generator().manual_seed(11)
    for n, k, groups in ((66, 301, 3), (96, 640, 2), (32, 64, 1)):  # 22-row groups straddle tiles
        w = rand_weight(fmt, n, k, seed=n + k, groups=groups)
        bias = torch.randn(n, generator=gen)
        for m in (2, 5, 17, 40):
            x = rand_x(m, k, seed=m * k)
            a = torch.rand(m, generator=gen) * 50 + 0.1
            for b in (None, bias):
                got, want = native.matmul(x, a, w, b), R.matmul(x, a, w, b)
                assert got.dtype == torch.float32 and torch.equal(got, want), (fmt, m, n, k, groups, b is None)


def test_amx_threads_and_scratch_sizes(amx):
    """Two pool threads (each with its own tile configuration and scratch), pieces that end on an
    odd tile, and the per-thread scratch growing with K between calls."""
    prev = native.num_threads()
    native.set_num_threads(2)
    try:
        for fmt in FORMATS:
            for n, k, m in ((1000, 256, 8), (1000, 256, 64), (200, 2000, 40), (200, 2000, 9), (520, 64, 33)):
                w = rand_weight(fmt, n, k, seed=n + k + m)
                x = rand_x(m, k, seed=k - m)
                assert torch.equal(native.gemm(x, w), R.gemm(x, w)), (fmt, m, n, k)
    finally:
        native.set_num_threads(prev)


def test_amx_extreme_inputs(amx):
    """All-(-128) and all-127 activations against all-(+1) / all-(-1) weights at K = 4096: the
    largest sums the formats allow in one row stay exact."""
    for fmt in FORMATS:
        for wv in (1, -1):
            t = torch.full((40, 4096), wv, dtype=torch.int8)
            w = P.pack_weight(t, 1.0, fmt)
            for xv in (-128, 127):
                x = torch.full((18, 4096), xv, dtype=torch.int8)
                got = native.gemm(x, w)
                assert torch.equal(got, R.gemm(x, w)) and int(got[0, 0]) == wv * xv * 4096, (fmt, wv, xv)


_SUBPROCESS = """
import sys, torch
from bitlm import packing as P
from bitlm.kernels import native
g = torch.Generator().manual_seed(5); outs = []
native.set_num_threads(2)
for fmt in ('i2', 't1', 'b1'):
    al = torch.tensor(P.get_format(fmt).alphabet, dtype=torch.int8)
    w = P.pack_weight(al[torch.randint(len(al), (90, 333), generator=g)], torch.rand(3, generator=g) + 0.1, fmt, 3)
    bias = torch.randn(90, generator=g)
    for m in (2, 3, 8, 16, 17, 33, 64):
        x = torch.randint(-128, 128, (m, 333), generator=g, dtype=torch.int8)
        a = torch.rand(m, generator=g) * 50 + 0.1
        outs += [native.gemm(x, w), native.matmul(x, a, w, bias)]
torch.save(outs, sys.argv[1]); print(native.info()['kernel_config'])
"""


def _amx_off_and_on(script: str) -> dict[str, tuple[list, str]]:
    """Run ``script`` (which saves its outputs to argv[1] and prints kernel_config) with
    BITLM_AMX=0 and =1 in fresh processes: {"0" / "1": (outputs, printed line)}."""
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for val in ("0", "1"):
            env = {k: v for k, v in os.environ.items() if k not in ("BITLM_AMX", "BITLM_KERNEL_TIER")}
            env["BITLM_AMX"] = val
            out = subprocess.run([sys.executable, "-c", script, f"{d}/{val}.pt"], env=env, capture_output=True,
                                 text=True, check=True, timeout=120)
            res[val] = (torch.load(f"{d}/{val}.pt"), out.stdout.strip())
    return res


def test_amx_env_switch_same_bytes():
    """BITLM_AMX=0 vs 1 in two processes: kernel_config reports the choice, and every output
    (int32 GEMM and float epilogue) is byte-identical."""
    _require_amx_library()
    res = _amx_off_and_on(_SUBPROCESS)
    assert "amx=off (BITLM_AMX=0)" in res["0"][1], res["0"][1]
    assert "amx=on" in res["1"][1], res["1"][1]
    assert len(res["0"][0]) == len(res["1"][0]) == 42
    for a, b in zip(res["0"][0], res["1"][0]):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_amx_built_where_the_cpu_has_it():
    """On a CPU with AMX whose compiler accepts -mamx-tile -mamx-int8, the library must contain the
    AMX GEMM: a failed x86_amx.c build is a failure here, not a silent fallback to VNNI; and
    without BITLM_AMX=0 it is on (or kernel_config says why the OS would not have it)."""
    cfg = _require_amx_library()
    if os.environ.get("BITLM_AMX", "") not in ("0", "off", "no", "false"):
        assert "amx=on" in cfg, cfg


# ---- the dense W8A8 head (bitlm_dense_i8a8) on AMX tiles -----------------------------------------

M_I8A8 = (2, 3, 8, 16, 17, 64, 2048)
# N: one tile, off 16, odd pass counts, a single row; K: one byte, below / off / at 64, > 10 steps
NK_I8A8 = ((16, 64), (67, 301), (33, 61), (130, 128), (1, 700), (17, 5), (48, 1))


def rand_i8a8(m: int, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    a = torch.rand(m, generator=gen) * 50 + 0.1
    s = torch.rand(n, generator=gen) + 0.05
    return xq, a, w, s


def test_amx_dense_i8a8_equals_reference(amx):
    """AMX == the torch reference (and == the AVX2 kernel) bit for bit: partial token blocks, N off
    the 16-row tile (the last tile's zero-padded K tail), K off 64 and below one step."""
    for n, k in NK_I8A8:
        for m in M_I8A8:
            if m == 2048 and n * k > 20000:
                continue
            xq, a, w, s = rand_i8a8(m, n, k, seed=m * 131 + n * k)
            want = R.dense_int8a8_matmul(xq, a, w, s)
            got = native.dense_int8a8_matmul(xq, a, w, s)
            assert got.dtype == torch.float32 and torch.equal(got, want), (m, n, k)
            native.set_tier("avx2")
            try:
                assert torch.equal(native.dense_int8a8_matmul(xq, a, w, s), want), (m, n, k, "avx2")
            finally:
                native.set_tier("avx512")


def test_amx_dense_i8a8_extremes_and_threads(amx):
    """-128 activations x +-127 weights up to the kernel's largest K (131071: |acc| = 128 * 127 K
    just below 2^31) stay exact; two pool threads split N into ranges that end off the tile."""
    for wv in (127, -127):
        for k in (4096, 131071):
            w = torch.full((19, k), wv, dtype=torch.int8)
            xq = torch.full((3, k), -128, dtype=torch.int8)
            a, s = torch.ones(3), torch.ones(19)
            got = native.dense_int8a8_matmul(xq, a, w, s)
            assert torch.equal(got, R.dense_int8a8_matmul(xq, a, w, s)), (wv, k)
            assert float(got[0, 0]) == float(torch.tensor(-128 * wv * k, dtype=torch.int32).float()), (wv, k)
    prev = native.num_threads()
    native.set_num_threads(2)
    try:
        for m, n, k in ((8, 1000, 256), (40, 1000, 333), (2048, 200, 130), (17, 520, 64)):
            xq, a, w, s = rand_i8a8(m, n, k, seed=n + k + m)
            assert torch.equal(native.dense_int8a8_matmul(xq, a, w, s), R.dense_int8a8_matmul(xq, a, w, s)), (m, n, k)
    finally:
        native.set_num_threads(prev)


_SUBPROCESS_I8A8 = """
import sys, torch
from bitlm.kernels import native
g = torch.Generator().manual_seed(9); outs = []
native.set_num_threads(2)
for n, k in ((90, 333), (16, 64), (33, 5)):
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) + 0.05
    for m in (2, 3, 8, 16, 17, 64, 2048):
        xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        a = torch.rand(m, generator=g) * 50 + 0.1
        outs.append(native.dense_int8a8_matmul(xq, a, w, s))
torch.save(outs, sys.argv[1]); print(native.info()['kernel_config'])
"""


def test_amx_dense_i8a8_same_bytes_as_vnni():
    """BITLM_AMX=0 (the avx512 tier's VNNI W8A8 kernel) vs 1 (AMX) in two processes: byte-identical
    float outputs."""
    _require_amx_library()
    res = _amx_off_and_on(_SUBPROCESS_I8A8)
    assert "tier=avx512" in res["0"][1] and "amx=off (BITLM_AMX=0)" in res["0"][1], res["0"][1]
    assert "amx=on" in res["1"][1], res["1"][1]
    assert len(res["0"][0]) == len(res["1"][0]) == 21
    for a, b in zip(res["0"][0], res["1"][0]):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))
