"""Training throughput: tokens/s and peak memory of the QAT step (b1, b1.58) against the fp step,
and data-parallel scaling on torchrun.

    python benchmarks/bench_train.py                           # small & base presets, CPU, batch 16 x 128
    python benchmarks/bench_train.py --presets small --rounds 1 --steps 2    # a smoke test
    python benchmarks/bench_train.py --quants fp,b1,b1.58,b1.58-legacy   # + the QAT step before the fast one
    python benchmarks/bench_train.py --quants fp,b1.58,b1.58-torchmm   # native W8A8 vs torch._int_mm product
    python benchmarks/bench_train.py --device cuda --precision bf16 --compile   # on a GPU machine
    python benchmarks/bench_train.py --presets small --quants fp,b1.58 --profile   # where QAT spends more than fp

Each (preset, quant) step is measured in its own process (so its peak memory is its own: RSS on
the CPU, ``torch.cuda.max_memory_allocated`` on CUDA), rounds interleaved (fp, b1, b1.58, fp, ...)
and the median step time of all rounds reported; the QAT/fp ratio divides medians of the same
run (``/fp``), and ``/fp rnd`` is the median of each round's own ratio (fp and the quant measured
back to back: the figure to trust when the machine's load drifts between rounds).  A step is forward + backward + AdamW on random tokens (``bitlm.train.lm_loss``; the cost
does not depend on the data), after one warm-up step.  ``QUANT-legacy`` times the QAT step with
``bitlm.layers.QAT_FAST`` off (what ``BITLM_QAT_FAST=0`` does: fake-quant floats in every forward,
no weight-code cache), in the same interleaved rounds as the fast one.

Scaling (``--ddp``, on by default on the CPU): the small preset, one process with one thread
against two DDP processes (torchrun, gloo) with one thread each, the same per-rank batch, so
ideal scaling doubles the global tokens/s.

Profile (``--profile``, instead of the timing table): per quant, torch.profiler's self CPU time per
op in the forward, the backward and the optimizer step separately (ms per step, mean of the timed
steps, the first preset), and per phase the ops where each QAT quant spends more than fp.  The
profiler sees only torch ops: the native kernels bitlm calls through ctypes count as the self
time of the op around them (``_Int8Projection`` / ``_Int8ProjectionBackward``), and Python outside
any op (BitLinear's own forward, the activation quantiser called before the autograd Function) is
in no row but in the phase total's difference to the wall time, printed beside it.

Writes a table to stdout and JSON (CPU model, kernel tier, torch, load average at the start and the
end, every number) to --json.
"""

from __future__ import annotations

import bitlm  # noqa: F401  sets OMP_WAIT_POLICY before torch loads (bitlm/__init__.py)

# isort: split
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bitlm.info import cpu_model

HERE = Path(__file__).resolve().parent
QUANTS = ("fp", "b1", "b1.58")


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(preset_name: str, quant: str, device_name: str, precision: str | None, compile_: bool,
            batch: int, seq: int, steps: int, parallel: str = "none", profile: bool = False) -> dict:
    """Median seconds per training step (one process, or this rank of a torchrun job)."""
    from bitlm import parallel as P
    from bitlm.config import preset
    from bitlm.model import BitNetModel
    from bitlm.train import TrainConfig, lm_loss, make_optimizer

    name = quant
    if quant.endswith("-torchmm"):  # the fast step with torch._int_mm instead of the native W8A8 kernel
        from bitlm import layers

        layers.QAT_MATMUL = "torch"
        quant = quant[: -len("-torchmm")]
    if quant.endswith("-legacy"):  # the QAT step before the fast one: fake-quant floats every forward
        from bitlm import layers

        layers.QAT_FAST = False
        quant = quant[: -len("-legacy")]
    if quant.endswith("-long"):  # the STE as it was before the short path: x + λ·(q - x).detach()
        _long_ste()
        quant = quant[: -len("-long")]
    P.setup_training_process()  # as bitlm.train.train does
    d = P.init_distributed(device_name, parallel)
    prec = P.resolve_precision(precision, d.device)
    base_mb = _peak_mb(d.device)
    cfg = preset(preset_name, quant=quant)
    torch.manual_seed(0)
    model = BitNetModel(cfg).to(d.device).train()
    if compile_:
        P.compile_blocks(model)
    model = P.wrap_model(model, d, prec)
    opt = make_optimizer(model, TrainConfig(recipe="fp").resolved(), 1e-8)
    g = torch.Generator().manual_seed(d.rank)
    if profile:
        return _profile_steps(model, opt, cfg, d, prec, batch, seq, steps, g, name)
    times = []
    for i in range(steps + 1):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        x, y = P.to_device(tokens[:, :-1], d.device), P.to_device(tokens[:, 1:], d.device)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lm_loss(model, x, y, prec == "bf16", d.device.type).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up (allocations, compile)
            times.append(time.perf_counter() - t0)
    d.barrier()
    out = {"preset": preset_name, "quant": name, "device": str(d.device), "precision": prec, "compile": compile_,
           "batch": batch, "seq": seq, "world": d.world, "step_s": statistics.median(times),
           "tok_s": batch * seq * d.world / statistics.median(times), "peak_mb": _peak_mb(d.device),
           "base_mb": base_mb, "threads": torch.get_num_threads()}
    d.close()
    return out


def _profile_steps(model, opt, cfg, d, prec: str, batch: int, seq: int, steps: int, g, name: str) -> dict:
    """Self CPU ms per step of each op, per phase (fwd, bwd, opt), after one warm-up step; and
    each phase's wall ms per step."""
    from torch.profiler import ProfilerActivity, profile

    from bitlm import parallel as P
    from bitlm.train import lm_loss

    ops: dict[str, dict[str, float]] = {"fwd": {}, "bwd": {}, "opt": {}}
    wall = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}

    def phase(key: str, fn):
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = fn()
        wall[key] += time.perf_counter() - t0
        for e in prof.key_averages():
            ops[key][e.key] = ops[key].get(e.key, 0.0) + e.self_cpu_time_total / 1e3
        return out

    for i in range(steps + 1):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        x, y = P.to_device(tokens[:, :-1], d.device), P.to_device(tokens[:, 1:], d.device)
        if i == 1:  # the first step warms up
            ops = {k: {} for k in ops}
            wall = dict.fromkeys(wall, 0.0)
        loss = phase("fwd", lambda x=x, y=y: lm_loss(model, x, y, prec == "bf16", d.device.type))
        phase("bwd", loss.backward)
        phase("opt", lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
    d.close()
    return {"quant": name, "threads": torch.get_num_threads(), "steps": steps,
            "ops_ms": {k: {op: v / steps for op, v in o.items()} for k, o in ops.items()},
            "wall_ms": {k: v / steps * 1e3 for k, v in wall.items()}}


def _print_profile(profiles: list[dict], top: int = 8) -> None:
    fp = next((p for p in profiles if p["quant"] == "fp"), None)
    for p in profiles:
        print(f"\n{p['quant']} ({p['threads']} threads, {p['steps']} steps): ms per step, self CPU per op")
        for ph in ("fwd", "bwd", "opt"):
            o = p["ops_ms"][ph]
            line = ", ".join(f"{k.replace('aten::', '')} {v:.1f}" for k, v in sorted(o.items(), key=lambda kv: -kv[1])[:top])
            print(f"  {ph}: ops {sum(o.values()):.0f} of wall {p['wall_ms'][ph]:.0f}: {line}")
            if fp is not None and p is not fp:
                f = fp["ops_ms"][ph]
                diff = {k: o.get(k, 0.0) - f.get(k, 0.0) for k in set(o) | set(f)}
                more = ", ".join(f"{k.replace('aten::', '')} {v:+.1f}" for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]
                                 if v > 0.5)
                less = ", ".join(f"{k.replace('aten::', '')} {v:+.1f}" for k, v in sorted(diff.items(), key=lambda kv: kv[1])[:3]
                                 if v < -0.5)
                print(f"     vs fp: wall {p['wall_ms'][ph] - fp['wall_ms'][ph]:+.0f}; more: {more or '-'}; less: {less or '-'}")


def _long_ste() -> None:
    from bitlm import layers
    from bitlm import quant as Q
    from bitlm.layers import BitLinear

    layers.QAT_FAST = False

    def ste(x, q, lam=1.0):
        d = (q - x).detach()
        if isinstance(lam, torch.Tensor) or lam != 1.0:
            d = d * lam
        return x + d

    Q.ste = ste
    BitLinear._lambda = lambda self: self.quant_lambda


def _child(args, preset_name: str, quant: str, env_extra: dict | None = None, nproc: int = 0) -> dict:
    one = ["--one", f"{preset_name},{quant}", "--device", args.device, "--batch", str(args.batch), "--seq",
           str(args.seq), "--steps", str(args.steps)]
    one += ["--precision", args.precision] if args.precision else []
    one += ["--compile"] if args.compile else []
    one += ["--profile"] if args.profile else []
    env = {**os.environ, **(env_extra or {})}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               __file__, *one, "--parallel", "ddp"]
    else:
        cmd = [sys.executable, __file__, *one]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"bench_train: child failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="small,base")
    ap.add_argument("--quants", default=",".join(QUANTS),
                    help="fp, b1, b1.58; QUANT-legacy: the QAT step without the fast path (BITLM_QAT_FAST=0: "
                         "fake-quant floats every forward); QUANT-long: the STE as x + λ(q - x).detach() "
                         "(before the short path; implies -legacy's float path); QUANT-torchmm: the fast step "
                         "with torch._int_mm for the integer product (BITLM_QAT_MATMUL=torch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on CUDA, fp32 elsewhere)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-ddp", action="store_true", help="skip the DDP scaling rows")
    ap.add_argument("--ddp-batch", type=int, default=8, help="per-rank batch of the scaling rows")
    ap.add_argument("--json", default=str(HERE / "results" / "train.json"))
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing: torch.profiler self CPU per op, forward / backward / optimizer, "
                         "each quant against fp (the first preset; see the module docstring)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        preset_name, quant = args.one.split(",")
        res = measure(preset_name, quant, args.device, args.precision, args.compile, args.batch, args.seq, args.steps,
                      args.parallel, args.profile)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res))
        return

    from bitlm import kernels

    info = kernels.backend_info()
    load_start = os.getloadavg()  # other jobs on the machine: recorded beside every number
    presets, quants = args.presets.split(","), args.quants.split(",")
    if args.profile:
        profiles = [_child(args, presets[0], q) for q in quants]
        print(f"{cpu_model()} — torch {torch.__version__}; kernels: {info.get('backend')} {info.get('tier')}; "
              f"preset {presets[0]}, batch {args.batch} x {args.seq}; load average {load_start[0]:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end")
        _print_profile(profiles)
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for p in presets:
            for q in quants:  # interleaved: every quant once per round
                runs.setdefault((p, q), []).append(_child(args, p, q))
    rows = []
    for rs in runs.values():
        step = statistics.median(r["step_s"] for r in rs)
        rows.append({**rs[0], "step_s": step, "tok_s": rs[0]["batch"] * rs[0]["seq"] / step,
                     "peak_mb": max(r["peak_mb"] for r in rs), "rounds": [r["step_s"] for r in rs]})
    for r in rows:
        fp = next((x for x in rows if x["preset"] == r["preset"] and x["quant"] == "fp"), None)
        r["ratio_vs_fp"] = r["step_s"] / fp["step_s"] if fp else None
        # each round's own ratio (fp and this quant measured back to back): a load that drifts
        # between rounds moves both sides of it, not one
        r["round_ratios"] = [a / b for a, b in zip(r["rounds"], fp["rounds"])] if fp else None
        r["ratio_rounds_median"] = statistics.median(r["round_ratios"]) if fp else None

    scaling = None
    if not args.no_ddp and args.device == "cpu":
        one_thread = {"OMP_NUM_THREADS": "1"}
        saved = args.batch
        args.batch = args.ddp_batch
        s1, s2 = [], []
        for rnd in range(args.rounds):
            print(f"scaling round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
            s1.append(_child(args, "small", "b1.58", one_thread))
            s2.append(_child(args, "small", "b1.58", one_thread, nproc=2))
        args.batch = saved
        t1 = statistics.median(r["tok_s"] for r in s1)
        t2 = statistics.median(r["tok_s"] for r in s2)
        scaling = {"preset": "small", "quant": "b1.58", "per_rank_batch": args.ddp_batch, "seq": args.seq,
                   "one_proc_one_thread_tok_s": t1, "ddp_two_proc_one_thread_tok_s": t2, "speedup": t2 / t1,
                   "rounds": {"one": [r["tok_s"] for r in s1], "ddp2": [r["tok_s"] for r in s2]}}

    print(f"\n{cpu_model()} — torch {torch.__version__}, device {args.device}, "
          f"threads {rows[0]['threads'] if rows else '-'}; kernels: {info.get('backend')} {info.get('tier')}; "
          f"load average {load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    hdr = (f"{'preset':<8}{'quant':<15}{'prec':<6}{'batch':>9}{'ms/step':>10}{'tok/s':>10}{'/fp':>7}{'/fp rnd':>9}"
           f"{'peak MB':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        ratio = f"{r['ratio_vs_fp']:.2f}" if r["ratio_vs_fp"] is not None else "-"
        per_round = f"{r['ratio_rounds_median']:.2f}" if r["ratio_rounds_median"] is not None else "-"
        print(f"{r['preset']:<8}{r['quant']:<15}{r['precision']:<6}{r['batch']:>4}x{r['seq']:<4}"
              f"{r['step_s'] * 1e3:>10.0f}{r['tok_s']:>10.0f}{ratio:>7}{per_round:>9}{r['peak_mb']:>9.0f}")
    if scaling:
        print(f"\nDDP scaling (small b1.58, {scaling['per_rank_batch']}x{args.seq} per rank, gloo): "
              f"1 proc x 1 thread {scaling['one_proc_one_thread_tok_s']:.0f} tok/s, "
              f"2 procs x 1 thread {scaling['ddp_two_proc_one_thread_tok_s']:.0f} tok/s = {scaling['speedup']:.2f}x")
    out = {"cpu": cpu_model(), "cpus": os.cpu_count(), "kernels": info, "torch": torch.__version__,
           "device": args.device, "rows": rows, "ddp_scaling": scaling, "rounds": args.rounds, "steps": args.steps,
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
