"""Which GEMV plan decodes fastest on this CPU: the fused decode step of a 2B4T-shaped model
(random ternary weights, int8 head read with int8 activations) under each candidate plan, in
interleaved rounds, against the plan the library picked for this CPU.

The decode GEMV (M = 1) reads each thread's rows as 1, 2 or 4 tiles' streams at once, with a
software prefetch a fixed distance ahead of each stream into L1 or L2 (``gemv=`` in
``bitlm_kernel_config``).  The library picks a plan per format by CPU vendor (csrc/dispatch.c);
``BITLM_GEMV_STREAMS`` / ``BITLM_GEMV_PREFETCH`` / ``BITLM_GEMV_PREFETCH_L2`` override it for a
process.  This benchmark runs every candidate in its own process (the plan is read once at
start-up), rounds interleaved, and prints decode tok/s, the read probe of the same process and
each candidate's ratio to the default with its round-by-round spread — the measurement to make
before changing the per-vendor defaults on a new CPU.

    python benchmarks/bench_gemv_plan.py                              # i2 and t1, 2 threads, 3 rounds
    python benchmarks/bench_gemv_plan.py --formats t1 --threads 1,2 --rounds 2
    python benchmarks/bench_gemv_plan.py --preset tiny-2b4t --decode-tokens 16 --rounds 1   # seconds, a smoke test

Writes a table to stdout and JSON (CPU, kernel config, every run) to --json.
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# name -> environment; "default" is the library's own choice for this CPU
PLANS = {
    "default": {},
    "1x8K/l1": {"BITLM_GEMV_STREAMS": "1", "BITLM_GEMV_PREFETCH": "8192", "BITLM_GEMV_PREFETCH_L2": "0"},
    "1x8K/l2": {"BITLM_GEMV_STREAMS": "1", "BITLM_GEMV_PREFETCH": "8192", "BITLM_GEMV_PREFETCH_L2": "1"},
    "2x8K/l1": {"BITLM_GEMV_STREAMS": "2", "BITLM_GEMV_PREFETCH": "8192", "BITLM_GEMV_PREFETCH_L2": "0"},
    "4x2K/l1": {"BITLM_GEMV_STREAMS": "4", "BITLM_GEMV_PREFETCH": "2048", "BITLM_GEMV_PREFETCH_L2": "0"},
    "4x2K/l2": {"BITLM_GEMV_STREAMS": "4", "BITLM_GEMV_PREFETCH": "2048", "BITLM_GEMV_PREFETCH_L2": "1"},
}


PLAN_VARS = ("BITLM_GEMV_STREAMS", "BITLM_GEMV_PREFETCH", "BITLM_GEMV_PREFETCH_L2")


def run_plan(path: Path, threads: int, decode_tokens: int, env_extra: dict) -> dict:
    """One decode measurement (bench_engine's child run) in a fresh process under the plan's environment."""
    env = {k: v for k, v in os.environ.items() if k not in PLAN_VARS}
    env.update(env_extra, OMP_NUM_THREADS=str(threads), BITLM_BACKEND="native", BITLM_FUSED_DECODE="1")
    cmd = [sys.executable, str(HERE / "bench_engine.py"), "--_run", f"{path}:{threads}", "--decode-tokens",
           str(decode_tokens), "--prefill", "", "--_head-act", "int8"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        raise SystemExit(f"bench_gemv_plan: the run under {env_extra or 'the default plan'} failed")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["pct_of_probe"] = 100 * r["decode_tok_s"] * r["bytes_per_token"] / (r["bandwidth_after_gb_s"] * 1e9)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--formats", default="i2,t1")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--plans", default=",".join(PLANS), help=f"candidates, comma separated, of {', '.join(PLANS)}")
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/bitlm/bench"))
    ap.add_argument("--json", default="benchmarks/results/gemv-plan.json")
    args = ap.parse_args()
    plans = [p for p in args.plans.split(",") if p]
    bad = [p for p in plans if p not in PLANS]
    if bad:
        raise SystemExit(f"bench_gemv_plan: --plans: unknown plan {bad[0]!r} (one of {', '.join(PLANS)})")
    if "default" not in plans:
        plans.insert(0, "default")

    from bench_engine import build_random_packed
    from bitlm.io.atomic import atomic_write_text
    from cpu_info import cpu_identity, describe

    threads = [int(t) for t in args.threads.split(",")]
    runs = []
    for rnd in range(args.rounds):
        for fmt in args.formats.split(","):
            path = build_random_packed(args.preset, fmt, "int8",
                                       Path(args.cache_dir) / f"{args.preset}-{fmt}-int8.bitlm")
            for t in threads:
                order = plans[rnd % len(plans):] + plans[:rnd % len(plans)]  # who goes first rotates
                for name in order:
                    r = run_plan(path, t, args.decode_tokens, PLANS[name])
                    r.update(round=rnd, format=fmt, threads=t, plan=name, load_avg_1m=os.getloadavg()[0])
                    runs.append(r)
                    print(f"round {rnd + 1} {fmt} {t} thr {name:<8} decode {r['decode_tok_s']:6.2f} tok/s "
                          f"probe {r['bandwidth_after_gb_s']:5.1f} GB/s  {r['pct_of_probe']:5.1f} % "
                          f"[{r['kernel_config'].split('gemv=')[1].split()[0]}]", file=sys.stderr, flush=True)

    cpu = cpu_identity()
    print(f"\n{describe(cpu)}")
    print(f"{'fmt':<4}{'thr':>4}  {'plan':<9}{'decode tok/s':>13}{'% probe':>9}   ÷ default (median [min – max])")
    rows = []
    for fmt in args.formats.split(","):
        for t in threads:
            base = {r["round"]: r["decode_tok_s"] for r in runs if (r["format"], r["threads"], r["plan"]) ==
                    (fmt, t, "default")}
            for name in plans:
                rs = [r for r in runs if (r["format"], r["threads"], r["plan"]) == (fmt, t, name)]
                ratios = [r["decode_tok_s"] / base[r["round"]] for r in rs]
                row = {"format": fmt, "threads": t, "plan": name, "env": PLANS[name],
                       "gemv": rs[0]["kernel_config"].split("gemv=")[1].split()[0],
                       "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                       "pct_of_probe": statistics.median(r["pct_of_probe"] for r in rs),
                       "ratio_to_default": statistics.median(ratios), "ratio_min": min(ratios),
                       "ratio_max": max(ratios)}
                rows.append(row)
                print(f"{fmt:<4}{t:>4}  {name:<9}{row['decode_tok_s']:>13.2f}{row['pct_of_probe']:>9.1f}   "
                      f"{row['ratio_to_default']:.3f} [{row['ratio_min']:.3f} – {row['ratio_max']:.3f}]")
    out = {"benchmark": "gemv_plan", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu,
           "preset": args.preset, "decode_tokens": args.decode_tokens, "rounds": args.rounds,
           "kernel_config_default": next(r["kernel_config"] for r in runs if r["plan"] == "default"),
           "rows": rows, "runs": runs}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(out, indent=1))
    print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
