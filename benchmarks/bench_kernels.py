"""Kernel benchmark: memory bandwidth, packed GEMV (decode) and GEMM (prefill) against torch.

Measured in one run, for each thread count (default 1 and 2):

* memory bandwidth on a 1 GiB buffer (≫ LLC): *read* with the library's own probe
  (``bitlm_mem_read``: the active tier's widest loads summed on all pool threads, C) and *copy*
  (``bitlm_mem_copy``: memcpy split over the pool threads, C; read + write bytes counted), plus
  ``numpy.copyto`` (one thread) as an outside reference;
* GEMV (M = 1) at 2560x2560, 6912x2560, 2560x6912 (N x K) for i2 / t1 / b1: *cold* — the call
  rotates through enough copies of the weight that ≥ 384 MB stream from DRAM per round, which
  is what a real decode step sees — and *hot* (one weight, cache-resident); reported as time per
  call, effective GB/s of packed weight bytes, % of the measured read bandwidth at the same
  thread count, GMAC/s, and the speed-up over torch fp32 and bf16 ``F.linear`` (also cold) on
  the same shape in the same run;
* the decode-time output head (128256 x 2560, the tied 2B4T embedding) stored as int8 rows
  (``dense_int8_matmul``) and bf16 rows (``dense_bf16_matmul``) against torch bf16 / fp32
  ``F.linear``;
* GEMM at M = 128 and 512 on the same shapes: GMAC/s per core and the ratio to torch fp32 /
  bf16 ``F.linear`` and ``torch._int_mm`` (int8 x int8 -> int32).
* ``--amx``: only the GEMM with the AMX int8 tile path on vs off (``BITLM_AMX=1`` / ``=0``, read
  once per process, so two worker processes of this script take turns: interleaved rounds, the
  order alternating, medians) at M = 2, 4, 8, 16, 64, 512 for i2 and t1 — cold weights (a
  rotation streaming from DRAM, what batched decode sees) up to M = 16, hot ones above — GMAC/s
  and the on/off speed-up, with the CPU (family / model) and both processes' ``kernel_config``;
  plus the dense W8A8 kernel (``dense_int8a8_matmul``, fmt ``i8a8``): the 128256 x 2560 head at
  M = 2-16 (cold) and the QAT step's products at M = 2048 (hot).  ``--amx-jobs dense`` (or
  ``packed``) runs one of the two sets.
* ``--variants``: the activation variants (``ModelConfig.act_variant``: a8, a4.8, v2-a8, v2-a4)
  end to end in the packed engine — prefill tokens/s and per-token decode time of a 2-layer model
  of the b1.58 700M shape (d 1536, FFN 4096) — and the Hadamard op alone (native vs torch
  reference) at 1536 / 4096 / 2560 / 6912 features.  ``--variants-only`` runs just that part.

Times are wall-clock medians of several repetitions through the public Python API (so the few
microseconds of ctypes overhead per call are included; the per-call overhead is measured on a
tiny matrix and reported).  The load average is recorded before and after: on a shared machine
other processes steal cores and bandwidth, and the numbers are only as good as that.

    BITLM_BACKEND=native python benchmarks/bench_kernels.py [--threads 1,2] [--json out.json] [--quick]
    BITLM_BACKEND=native python benchmarks/bench_kernels.py --amx [--threads 1,2] [--rounds 3] [--amx-jobs dense]
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bitlm import kernels, memory
from bitlm.info import cpu_model
from bitlm.io.atomic import atomic_write_text
from bitlm.kernels import native
from bitlm.packing import PackedWeight, get_format, pack_weight
from cpu_info import cpu_identity, describe  # benchmarks/cpu_info.py

SHAPES = ((2560, 2560), (6912, 2560), (2560, 6912))  # (N, K): q/o, gate/up, down of 2B4T
FORMATS = ("i2", "t1", "b1")
COLD_BYTES = 384 << 20


def timeit(fn, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"median": statistics.median(ts), "best": min(ts)}


def set_threads(n: int) -> None:
    native.set_num_threads(n)
    torch.set_num_threads(n)


def settle() -> None:
    """Let torch's OpenMP workers stop spinning before timing a native kernel: after a parallel
    region libgomp busy-waits for milliseconds (GOMP_SPINCOUNT), and on a 2-core machine that
    spinning thread takes the core the kernel's second thread needs (measured: 2-thread GEMM
    right after F.linear ran at ~1-thread speed)."""
    time.sleep(0.05)


# ---- bandwidth ---------------------------------------------------------------------------------


def bandwidth(threads: int, gib: float, reps: int) -> dict:
    set_threads(threads)
    n = int(gib * (1 << 30))
    # huge pages where available (as the engine's weights), page-faulted in, 64-B aligned
    src, dst = memory.zeros(2, (n,), torch.uint8, hugepages=True)
    settle()  # the zeroing ran on torch's OpenMP threads
    rd = timeit(lambda: native.mem_read(src), 3 * reps)
    cp = timeit(lambda: native.mem_copy(dst, src), 2 * reps)
    out = {"threads": threads, "bytes": n,
           "read_GBps": n / rd["median"] / 1e9, "read_best_GBps": n / rd["best"] / 1e9,
           "copy_GBps": 2 * n / cp["median"] / 1e9, "copy_best_GBps": 2 * n / cp["best"] / 1e9}
    if threads == 1:
        a, b = src.numpy(), dst.numpy()
        npc = timeit(lambda: np.copyto(b, a), reps)
        out["numpy_copy_GBps"] = 2 * n / npc["median"] / 1e9
    return out


# ---- GEMV --------------------------------------------------------------------------------------


def random_packed(fmt: str, n: int, k: int, seed: int = 0) -> PackedWeight:
    g = torch.Generator().manual_seed(seed)
    alpha = torch.tensor(get_format(fmt).alphabet, dtype=torch.int8)
    t = alpha[torch.randint(len(alpha), (n, k), generator=g)]
    return pack_weight(t, torch.tensor([0.02]), fmt)


def rotation(w: PackedWeight) -> list[PackedWeight]:
    """Copies of w in one big buffer, enough to stream COLD_BYTES per round (cache-cold calls)."""
    copies = max(2, COLD_BYTES // w.nbytes)
    big = memory.zeros(1, (copies, w.data.numel()), torch.uint8)[0]  # huge pages, as a loaded model's
    big.copy_(w.data.reshape(1, -1).expand(copies, -1))
    return [PackedWeight(w.format, w.version, w.N, w.K, big[i].view(w.data.shape), w.scale) for i in range(copies)]


def torch_rotation(n: int, k: int, dtype: torch.dtype) -> list[torch.Tensor]:
    one = torch.randn(n, k).to(dtype)
    copies = max(2, COLD_BYTES // (one.numel() * one.element_size()))
    return [one.clone() for _ in range(copies)]


def per_call(fn_over, items: list, reps: int) -> dict:
    r = timeit(lambda: fn_over(items), reps)
    return {k: v / len(items) for k, v in r.items()}


_PROBE: torch.Tensor | None = None


def local_read_bw(reps: int = 5) -> float:
    """Read bandwidth (GB/s, best of reps) of a 512 MB buffer with the current thread count,
    measured right next to a GEMV: on a VM the memory bandwidth drifts with the neighbours
    (the 2-thread probe gave 40 GB/s in one run and 80 GB/s in another), so each GEMV row is
    also compared with a probe taken seconds, not minutes, away."""
    global _PROBE
    if _PROBE is None:
        _PROBE = memory.zeros(1, (COLD_BYTES + (128 << 20),), torch.uint8, hugepages=True)[0]  # pages faulted in
    return _PROBE.numel() / timeit(lambda: native.mem_read(_PROBE), reps)["best"] / 1e9


def gemv_rows(threads: int, read_bw: float, read_best: float, reps: int, shapes) -> list[dict]:
    set_threads(threads)
    rows = []
    for n, k in shapes:
        x = torch.randn(1, k)
        base = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            ws = torch_rotation(n, k, dtype)
            xd = x.to(dtype)

            def run(items, xd=xd):
                for w in items:
                    F.linear(xd, w)

            base[name] = per_call(run, ws, reps)["median"]
            del ws
        settle()
        xq, _ = kernels.quantize_rows(x)
        for fmt in FORMATS:
            w = random_packed(fmt, n, k)
            ws = rotation(w)

            def run(items, xq=xq):
                for ww in items:
                    native.gemm(xq, ww)

            cold = per_call(run, ws, 3 * reps)  # more rounds: 'best' needs a quiet moment
            hot = timeit(lambda w=w, xq=xq: native.gemm(xq, w), reps * 20, warmup=5)
            # the same cold rotation through raw ctypes calls with pointers prepared up front:
            # the kernel's own time, without the ~3 us of Python/torch per API call
            lib, fid, y = native.load(), w.fmt.native_id, torch.empty((1, n), dtype=torch.int32)
            ptrs = [ww.data.data_ptr() for ww in ws]
            xp, yp = xq.data_ptr(), y.data_ptr()

            def run_raw(items, lib=lib, fid=fid, xp=xp, yp=yp, k=k, n=n):
                g = lib.bitlm_gemm
                for wp in items:
                    g(fid, xp, 1, k, wp, n, yp)

            raw = per_call(run_raw, ptrs, 3 * reps)
            local = local_read_bw()
            del ws
            t = cold["median"]
            gbps = w.nbytes / t / 1e9
            best = w.nbytes / cold["best"] / 1e9
            rows.append({
                "GBps_best": best, "pct_read_bw_best": 100 * best / read_best,
                "kernel_us": raw["median"] * 1e6, "kernel_GBps": w.nbytes / raw["median"] / 1e9,
                "kernel_pct_read_bw": 100 * w.nbytes / raw["median"] / 1e9 / read_bw,
                "local_read_GBps": local, "pct_local_read_bw": 100 * gbps / local,
                "kernel_pct_local_read_bw": 100 * w.nbytes / raw["median"] / 1e9 / local,
                "threads": threads, "fmt": fmt, "N": n, "K": k, "bytes": w.nbytes,
                "cold_us": t * 1e6, "cold_best_us": cold["best"] * 1e6, "hot_us": hot["median"] * 1e6,
                "GBps": gbps, "pct_read_bw": 100 * gbps / read_bw, "GMACps": n * k / t / 1e9,
                "torch_fp32_us": base["fp32"] * 1e6, "torch_bf16_us": base["bf16"] * 1e6,
                "speedup_vs_fp32": base["fp32"] / t, "speedup_vs_bf16": base["bf16"] / t,
            })
            print(f"  gemv {threads}t {fmt} {n}x{k}: {t * 1e6:7.1f} us  {gbps:5.1f} GB/s "
                  f"({rows[-1]['pct_read_bw']:5.1f}% of read)", file=sys.stderr)
    return rows


# ---- GEMM --------------------------------------------------------------------------------------


def gemm_rows(threads: int, reps: int, shapes, ms) -> list[dict]:
    set_threads(threads)
    rows = []
    for n, k in shapes:
        for m in ms:
            macs = m * n * k
            x = torch.randn(m, k)
            wf = torch.randn(n, k)
            xb, wb = x.bfloat16(), wf.bfloat16()
            xi = torch.randint(-128, 128, (m, k), dtype=torch.int8)
            wi = torch.randint(-128, 128, (k, n), dtype=torch.int8)
            base = {
                "fp32": timeit(lambda x=x, wf=wf: F.linear(x, wf), reps)["median"],
                "bf16": timeit(lambda xb=xb, wb=wb: F.linear(xb, wb), reps)["median"],
                "int_mm": timeit(lambda xi=xi, wi=wi: torch._int_mm(xi, wi), reps)["median"],
            }
            settle()
            xq, _ = kernels.quantize_rows(x)
            for fmt in FORMATS:
                w = random_packed(fmt, n, k)
                t = timeit(lambda w=w, xq=xq: native.gemm(xq, w), reps)["median"]
                rows.append({
                    "threads": threads, "fmt": fmt, "M": m, "N": n, "K": k, "ms": t * 1e3,
                    "GMACps": macs / t / 1e9, "GMACps_per_core": macs / t / 1e9 / threads,
                    "torch_fp32_GMACps": macs / base["fp32"] / 1e9, "torch_bf16_GMACps": macs / base["bf16"] / 1e9,
                    "torch_int_mm_GMACps": macs / base["int_mm"] / 1e9,
                    "speedup_vs_fp32": base["fp32"] / t, "speedup_vs_bf16": base["bf16"] / t,
                    "speedup_vs_int_mm": base["int_mm"] / t,
                })
                print(f"  gemm {threads}t {fmt} M={m} {n}x{k}: {macs / t / 1e9 / threads:6.1f} GMAC/s/core",
                      file=sys.stderr)
    return rows


def small_m_rows(threads: int, reps: int, shapes, ms=(1, 2, 4, 8)) -> list[dict]:
    """Serving's batched decode: M = 1..8 tokens against cold weights (the rotation streams
    COLD_BYTES per round from DRAM), time per call and its ratio to M = 1 of the same shape.
    The path M > 1 takes (one M-token block, or the large-M loop) is fixed per process by
    BITLM_GEMM_SMALL_M: run once with it unset and once with =0 to compare."""
    set_threads(threads)
    rows = []
    for n, k in shapes:
        for fmt in ("i2", "t1"):
            ws = rotation(random_packed(fmt, n, k))
            t1 = None
            for m in ms:
                xq = torch.randint(-127, 128, (m, k), dtype=torch.int8)
                a = torch.rand(m) + 0.5

                def run(xq=xq, a=a, ws=ws):
                    for w in ws:
                        native.matmul(xq, a, w)

                t = timeit(run, reps)["median"] / len(ws)
                t1 = t if m == 1 else t1
                rows.append({"threads": threads, "fmt": fmt, "M": m, "N": n, "K": k, "ms": t * 1e3,
                             "x_M1": t / t1, "GMACps": m * n * k / t / 1e9})
                print(f"  small-M {threads}t {fmt} M={m} {n}x{k}: {t * 1e3:.3f} ms ({t / t1:.2f}x M=1)",
                      file=sys.stderr)
    return rows


# ---- AMX on vs off -------------------------------------------------------------------------------

AMX_MS = (2, 4, 8, 16, 64, 512)
AMX_SHAPES = ((2560, 2560), (6912, 2560))  # (N, K): q/o and gate/up of 2B4T
AMX_COLD_MAX_M = 16  # up to this M the weights rotate (cold, as in batched decode); hot above
# the dense W8A8 kernel (dense_int8a8_matmul, fmt "i8a8" below): the 2B4T output head in batched
# decode (cold), and the QAT step's forward products of the small / base presets (batch 16 x 128)
I8A8_JOBS = tuple((128256, 2560, m) for m in (2, 4, 8, 16)) + tuple(
    (n, k, 2048) for n, k in ((256, 256), (704, 256), (256, 704), (512, 512), (1408, 512), (512, 1408)))


def amx_worker() -> int:
    """One side of ``--amx``: reads one JSON job per line from stdin ({fmt, n, k, m, threads,
    reps}), answers {"s": median seconds per call} on stdout; the first line out is this
    process's kernel_config."""
    print(json.dumps({"kernel_config": native.info().get("kernel_config")}), flush=True)
    cache: dict = {}
    for line in sys.stdin:
        job = json.loads(line)
        set_threads(job["threads"])
        key = (job["fmt"], job["n"], job["k"], job["m"] <= AMX_COLD_MAX_M)
        if key not in cache:
            if job["fmt"] == "i8a8":  # dense int8 rows (N, K): one, or copies streaming COLD_BYTES
                one = torch.randint(-127, 128, (job["n"], job["k"]), dtype=torch.int8)
                cache[key] = [one.clone() for _ in range(max(2, COLD_BYTES // one.numel()))] if key[3] else [one]
            else:
                w = random_packed(job["fmt"], job["n"], job["k"])
                cache[key] = rotation(w) if key[3] else [w]
        ws = cache[key]
        xq = torch.randint(-127, 128, (job["m"], job["k"]), dtype=torch.int8,
                           generator=torch.Generator().manual_seed(job["m"]))
        a = torch.rand(job["m"]) + 0.5
        scale = torch.rand(job["n"]) + 0.5
        inner = max(1, int(0.05 / max(job["m"] * job["n"] * job["k"] / 1e12, 1e-6)) // len(ws))

        def run(ws=ws, xq=xq, a=a, inner=inner, scale=scale, dense=job["fmt"] == "i8a8"):
            for _ in range(inner):
                for w in ws:
                    if dense:
                        native.dense_int8a8_matmul(xq, a, w, scale)
                    else:
                        native.matmul(xq, a, w)

        t = timeit(run, job["reps"])["median"] / (len(ws) * inner)
        print(json.dumps({"s": t}), flush=True)
    return 0


def amx_rows(threads: list[int], rounds: int, reps: int, quick: bool,
             which: str = "all") -> tuple[list[dict], dict]:
    """Both sides of ``--amx``: two workers (BITLM_AMX=1 and =0), every job run on both in each
    round, the side going first alternating by round; medians over rounds.  which: "all", "packed"
    (the i2 / t1 GEMM only) or "dense" (only the W8A8 kernel's I8A8_JOBS, fmt "i8a8")."""
    procs = {}
    configs = {}
    for amx in ("on", "off"):
        env = dict(os.environ, BITLM_AMX="1" if amx == "on" else "0")
        procs[amx] = subprocess.Popen([sys.executable, __file__, "--amx-worker"] + (["--quick"] if quick else []),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        configs[amx] = json.loads(procs[amx].stdout.readline())["kernel_config"]
    jobs = [] if which == "dense" else [{"fmt": fmt, "n": n, "k": k, "m": m, "threads": t, "reps": reps}
            for t in threads for n, k in (AMX_SHAPES[:1] if quick else AMX_SHAPES) for fmt in ("i2", "t1")
            for m in ((8, 64) if quick else AMX_MS)]
    if which != "packed":
        jobs += [{"fmt": "i8a8", "n": n, "k": k, "m": m, "threads": t, "reps": reps}
                 for t in threads for n, k, m in ((I8A8_JOBS[2], I8A8_JOBS[5]) if quick else I8A8_JOBS)]
    times: dict = {}
    try:
        for r in range(rounds):
            for j, job in enumerate(jobs):
                for amx in (("on", "off") if (r + j) % 2 == 0 else ("off", "on")):
                    procs[amx].stdin.write(json.dumps(job) + "\n")
                    procs[amx].stdin.flush()
                    times.setdefault((j, amx), []).append(json.loads(procs[amx].stdout.readline())["s"])
            print(f"  amx round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait(timeout=60)
    rows = []
    for j, job in enumerate(jobs):
        macs = job["m"] * job["n"] * job["k"]
        on, off = statistics.median(times[(j, "on")]), statistics.median(times[(j, "off")])
        rows.append({"threads": job["threads"], "fmt": job["fmt"], "M": job["m"], "N": job["n"], "K": job["k"],
                     "weights": "cold" if job["m"] <= AMX_COLD_MAX_M else "hot",
                     "amx_ms": on * 1e3, "vnni_ms": off * 1e3, "amx_GMACps": macs / on / 1e9,
                     "vnni_GMACps": macs / off / 1e9, "speedup": off / on,
                     "amx_rounds_ms": [t * 1e3 for t in times[(j, "on")]],
                     "vnni_rounds_ms": [t * 1e3 for t in times[(j, "off")]]})
    return rows, configs


def print_amx(res: dict) -> None:
    e = res["env"]
    print(f"\n# GEMM, AMX on vs off — {describe(e['cpu_identity'])}\n# on:  {e['amx']['kernel_config_on']}\n"
          f"# off: {e['amx']['kernel_config_off']}\n# load average before/after: {e['loadavg_before']} / "
          f"{e.get('loadavg_after')}; {e['amx']['rounds']} interleaved rounds, medians\n")
    print("| thr | fmt | N x K | M | weights | AMX ms | VNNI ms | AMX GMAC/s | VNNI GMAC/s | AMX speed-up |")
    print("|---:|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in res["amx"]:
        print(f"| {r['threads']} | {r['fmt']} | {r['N']}x{r['K']} | {r['M']} | {r['weights']} | {r['amx_ms']:.3f} | "
              f"{r['vnni_ms']:.3f} | {r['amx_GMACps']:.0f} | {r['vnni_GMACps']:.0f} | {r['speedup']:.2f}x |")


# ---- int8 / bf16 output head ---------------------------------------------------------------------


def head_rows(threads: int, reps: int, vocab: int, d: int) -> list[dict]:
    """Decode-time output head (vocab x d, the tied 2B4T embedding): int8 rows with per-row scale
    (``dense_int8_matmul``, 1 byte/weight) and bf16 rows (``dense_bf16_matmul``, 2 bytes/weight)
    against torch bf16 / fp32 ``F.linear`` (2 / 4 bytes)."""
    set_threads(threads)
    x = torch.randn(1, d)
    w8 = torch.randint(-127, 128, (vocab, d), dtype=torch.int8)
    s = torch.rand(vocab) / 100
    settle()
    t8 = timeit(lambda w8=w8: kernels.dense_int8_matmul(x, w8, s), reps)["median"]
    out = {"threads": threads, "V": vocab, "K": d, "int8_ms": t8 * 1e3, "int8_GBps": vocab * d / t8 / 1e9}
    del w8
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        wf = torch.randn(vocab, d).to(dtype)
        if name == "bf16":
            settle()
            tb = timeit(lambda wf=wf: kernels.dense_bf16_matmul(x, wf), reps)["median"]
            out["bf16_native_ms"], out["bf16_native_GBps"] = tb * 1e3, 2 * vocab * d / tb / 1e9
        xd = x.to(dtype)
        out[f"{name}_ms"] = timeit(lambda wf=wf, xd=xd: F.linear(xd, wf), reps)["median"] * 1e3
        del wf
    print(f"  head {threads}t {vocab}x{d}: int8 {t8 * 1e3:.2f} ms ({out['int8_GBps']:.1f} GB/s), bf16 native "
          f"{out['bf16_native_ms']:.2f} ms ({out['bf16_native_GBps']:.1f} GB/s), torch bf16 {out['bf16_ms']:.2f} ms",
          file=sys.stderr)
    return [out]


# ---- report --------------------------------------------------------------------------------------


def call_overhead_us(reps: int) -> float:
    w = random_packed("i2", 16, 16)
    xq = torch.zeros(1, 16, dtype=torch.int8)
    return timeit(lambda: native.gemm(xq, w), reps * 200, warmup=50)["median"] * 1e6


def print_tables(res: dict) -> None:
    e = res["env"]
    print(f"\n# bitlm kernel benchmark — {describe(e['cpu_identity']) if 'cpu_identity' in e else e['cpu']} — "
          f"torch {e['torch']}\n# kernel choices: {e.get('kernel_config')}")
    print(f"# load average before/after: {e['loadavg_before']} / {e.get('loadavg_after')}; "
          f"python->C call overhead {res['call_overhead_us']:.1f} us\n")
    print("| threads | read GB/s | copy GB/s (r+w) | numpy copy GB/s |")
    print("|---:|---:|---:|---:|")
    for b in res["bandwidth"]:
        npc = f"{b['numpy_copy_GBps']:.1f}" if "numpy_copy_GBps" in b else "-"
        print(f"| {b['threads']} | {b['read_GBps']:.1f} (best {b['read_best_GBps']:.1f}) | {b['copy_GBps']:.1f} | {npc} |")
    print("\nGEMV (M=1), cold weights (DRAM):\n")
    print("(median of rounds; 'best' = fastest round vs the fastest read round, the uncontended estimate)\n")
    print("(API: through bitlm.kernels.native.gemm; kernel: raw ctypes calls, no per-call Python work)\n")
    print("('local': a read probe taken right after the row, the same thread count)\n")
    print("| thr | fmt | N x K | us | GB/s | % read BW | best % | kernel GB/s | kernel % | local read GB/s "
          "| % local | kernel % local | GMAC/s | hot us | vs fp32 | vs bf16 |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["gemv"]:
        print(f"| {r['threads']} | {r['fmt']} | {r['N']}x{r['K']} | {r['cold_us']:.0f} | {r['GBps']:.1f} | "
              f"{r['pct_read_bw']:.0f}% | {r['pct_read_bw_best']:.0f}% | "
              f"{r['kernel_GBps']:.1f} | {r['kernel_pct_read_bw']:.0f}% | {r['local_read_GBps']:.1f} | "
              f"{r['pct_local_read_bw']:.0f}% | {r['kernel_pct_local_read_bw']:.0f}% | {r['GMACps']:.0f} | "
              f"{r['hot_us']:.0f} | {r['speedup_vs_fp32']:.1f}x | {r['speedup_vs_bf16']:.1f}x |")
    print("\nOutput head GEMV (M=1), int8 and bf16 rows (native) vs torch F.linear:\n")
    print("| thr | V x K | int8 ms | int8 GB/s | bf16 native ms | bf16 native GB/s | torch bf16 ms | torch fp32 ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in res["head"]:
        print(f"| {r['threads']} | {r['V']}x{r['K']} | {r['int8_ms']:.2f} | {r['int8_GBps']:.1f} | "
              f"{r['bf16_native_ms']:.2f} | {r['bf16_native_GBps']:.1f} | {r['bf16_ms']:.2f} | {r['fp32_ms']:.2f} |")
    print("\nGEMM (prefill):\n")
    print("| thr | fmt | M | N x K | GMAC/s | per core | torch fp32 | bf16 | _int_mm | vs fp32 | vs bf16 | vs int_mm |")
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["gemm"]:
        print(f"| {r['threads']} | {r['fmt']} | {r['M']} | {r['N']}x{r['K']} | {r['GMACps']:.0f} | "
              f"{r['GMACps_per_core']:.0f} | {r['torch_fp32_GMACps']:.0f} | {r['torch_bf16_GMACps']:.0f} | "
              f"{r['torch_int_mm_GMACps']:.0f} | {r['speedup_vs_fp32']:.1f}x | {r['speedup_vs_bf16']:.1f}x | "
              f"{r['speedup_vs_int_mm']:.1f}x |")


def write_json(path: str, res: dict) -> None:
    """The run's results as JSON at ``path`` (its folder made, written atomically)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(res, indent=1))
    print(f"\nwrote {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--json", default="runs/bench_kernels.json", help="where to write the JSON results")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one shape, small buffers: a smoke test")
    ap.add_argument("--variants", action="store_true", help="also time the activation variants (a4.8, v2)")
    ap.add_argument("--variants-only", action="store_true", help="time only the activation variants")
    ap.add_argument("--amx", action="store_true",
                    help="only the GEMM with AMX on vs off (two worker processes, interleaved rounds)")
    ap.add_argument("--amx-jobs", choices=("all", "packed", "dense"), default="all",
                    help="--amx: the packed i2 / t1 GEMM, the dense W8A8 kernel (dense_int8a8_matmul), or both")
    ap.add_argument("--amx-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3, help="--amx: interleaved rounds")
    ap.add_argument("--small-m", action="store_true",
                    help="only the small-M GEMM table (M = 1, 2, 4, 8, cold weights; compare runs with "
                         "BITLM_GEMM_SMALL_M unset and =0)")
    args = ap.parse_args(argv)

    if native.load() is None:
        print(f"bench_kernels: native kernels unavailable: {native.reason()}", file=sys.stderr)
        return 1
    threads = [int(t) for t in args.threads.split(",")]
    if args.amx_worker:
        if args.quick:
            globals()["COLD_BYTES"] = 64 << 20
        return amx_worker()
    shapes = SHAPES[:1] if args.quick else SHAPES
    ms = (128,) if args.quick else (128, 512)
    gib = 0.25 if args.quick else 1.0
    if args.quick:
        global COLD_BYTES
        COLD_BYTES = 64 << 20

    info = kernels.backend_info()
    res: dict = {"env": {
        "cpu": cpu_model(), "tier": info["tier"], "cpu_flags": info["cpu_flags"], "build": info["build"],
        "torch": torch.__version__, "python": platform.python_version(), "threads": threads,
        "loadavg_before": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_identity": cpu_identity(), "kernel_config": info.get("kernel_config"),
    }}
    # the AMX GEMM's state in this process (on, or off and why); --amx compares both
    kc = info.get("kernel_config") or ""
    res["env"]["amx_state"] = kc[kc.index("amx=") + 4:] if "amx=" in kc else "unknown"
    if args.variants_only:
        return variants_main(res, threads, args)
    if args.amx:
        res["amx"], cfgs = amx_rows(threads, args.rounds, args.reps, args.quick, args.amx_jobs)
        ident = res["env"]["cpu_identity"]
        res["env"]["amx"] = {"cpu_has_amx": "amx_tile" in ident.get("flags", []) and "amx_int8" in ident.get("flags", []),
                             "kernel_config_on": cfgs["on"], "kernel_config_off": cfgs["off"], "rounds": args.rounds,
                             "family": ident.get("family"), "model": ident.get("model")}
        res["env"]["loadavg_after"] = os.getloadavg()
        print_amx(res)
        write_json(args.json, res)
        return 0
    if args.small_m:
        res["small_m"] = [r for t in threads for r in small_m_rows(t, args.reps, [(2 * 6912, 2560), (2560, 6912)])]
        res["env"]["loadavg_after"] = os.getloadavg()
        print(f"\n# small-M GEMM — {describe(res['env']['cpu_identity'])}\n# {res['env']['kernel_config']}; "
              f"load {res['env']['loadavg_before']} -> {res['env']['loadavg_after']}")
        for r in res["small_m"]:
            print(f"{r['threads']} thr {r['fmt']} {r['N']}x{r['K']} M={r['M']}: {r['ms']:.3f} ms, {r['x_M1']:.2f}x M=1")
        write_json(args.json, res)
        return 0
    res["call_overhead_us"] = call_overhead_us(args.reps)
    res["bandwidth"] = [bandwidth(t, gib, args.reps) for t in threads]
    read_bw = {b["threads"]: (b["read_GBps"], b["read_best_GBps"]) for b in res["bandwidth"]}
    res["gemv"] = [r for t in threads for r in gemv_rows(t, *read_bw[t], args.reps, shapes)]
    vocab = 8192 if args.quick else 128256
    res["head"] = [r for t in threads for r in head_rows(t, args.reps, vocab, 2560)]
    res["gemm"] = [r for t in threads for r in gemm_rows(t, max(2, args.reps // 2), shapes, ms)]
    if args.variants:
        res["variants"] = [r for t in threads for r in variant_rows(t, args.reps, args.quick)]
    res["env"]["loadavg_after"] = os.getloadavg()
    print_tables(res)
    if args.variants:
        print_variants(res)
    write_json(args.json, res)
    return 0


def variant_rows(threads: int, reps: int, quick: bool = False) -> list[dict]:
    """Prefill and decode of the activation variants in the packed engine, and the Hadamard op."""
    from bitlm.config import ModelConfig
    from bitlm.engine import convert
    from bitlm.kernels import reference
    from bitlm.model import BitNetModel

    set_threads(threads)
    torch.set_num_threads(threads)
    d, f, heads, prefill, decode = (256, 768, 4, 32, 8) if quick else (1536, 4096, 24, 128, 32)
    rows: list[dict] = []
    for width in ((256,) if quick else (1536, 4096, 2560, 6912)):
        x = torch.randn(prefill, width)
        tn = timeit(lambda x=x: native.hadamard(x), reps)["median"]
        tr = timeit(lambda x=x: reference.hadamard(x), reps)["median"]
        rows.append({"threads": threads, "op": "hadamard", "M": prefill, "K": width, "native_us": tn * 1e6,
                     "reference_us": tr * 1e6})
        print(f"  hadamard {threads}t {prefill}x{width}: native {tn * 1e6:.0f} us, torch {tr * 1e6:.0f} us", flush=True)
    for variant in ("a8", "a4.8", "v2-a8", "v2-a4"):
        torch.manual_seed(0)
        cfg = ModelConfig(arch="bitnet-2b4t", vocab_size=4096, d_model=d, d_ff=f, n_layers=2, n_heads=heads,
                          max_seq_len=prefill + decode + 1, act_variant=variant)
        pm = convert(BitNetModel(cfg).eval())
        ids = torch.randint(0, 4096, (1, prefill))
        t_pre = timeit(lambda pm=pm, ids=ids: pm(ids, last_only=True), max(2, reps // 2))["median"]

        def run_decode(fused: bool, pm=pm, ids=ids) -> float:
            pm.fused_decode = fused
            cache = pm.new_cache(1)
            pm(ids[:, :1], cache=cache)
            t0 = time.perf_counter()
            for i in range(decode):
                pm(ids[:, i + 1 : i + 2], cache=cache)
            return (time.perf_counter() - t0) / decode

        modes = [("per-op", False)] + ([("fused", True)] if variant == "a8" else [])
        for mode, fused in modes:
            t_dec = statistics.median(run_decode(fused) for _ in range(max(2, reps // 2)))
            rows.append({"threads": threads, "op": "model", "variant": variant, "decode_mode": mode, "d_model": d,
                         "d_ff": f, "n_layers": 2, "prefill_tokens": prefill, "prefill_s": t_pre,
                         "prefill_tok_s": prefill / t_pre, "decode_ms_per_token": t_dec * 1e3})
            print(f"  {variant:6s} {threads}t: prefill {prefill / t_pre:7.0f} tok/s, decode ({mode}) "
                  f"{t_dec * 1e3:6.2f} ms/token", flush=True)
        pm.fused_decode = True
    return rows


def print_variants(res: dict) -> None:
    e = res["env"]
    print(f"\nActivation variants in the packed engine — {e['cpu']} — load average {e['loadavg_before']} / "
          f"{e.get('loadavg_after')}:\n")
    print("| thr | variant | decode path | prefill tok/s | decode ms/token |")
    print("|---:|---|---|---:|---:|")
    for r in res["variants"]:
        if r["op"] == "model":
            print(f"| {r['threads']} | {r['variant']} | {r['decode_mode']} | {r['prefill_tok_s']:.0f} | "
                  f"{r['decode_ms_per_token']:.2f} |")
    print("\n| thr | Hadamard M x K | native us | torch us |")
    print("|---:|---|---:|---:|")
    for r in res["variants"]:
        if r["op"] == "hadamard":
            print(f"| {r['threads']} | {r['M']}x{r['K']} | {r['native_us']:.0f} | {r['reference_us']:.0f} |")


def variants_main(res: dict, threads: list[int], args) -> int:
    res["variants"] = [r for t in threads for r in variant_rows(t, args.reps, args.quick)]
    res["env"]["loadavg_after"] = os.getloadavg()
    print_variants(res)
    write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
