"""Tensor parallelism on the CPU: a TP=2 training step (``group`` and ``global`` scales) against a
DP=2 (DDP) step and one process, and the bytes each puts into collectives per step.

    python benchmarks/bench_tp.py                                # small preset, batch 8 x 128, 2 rounds
    python benchmarks/bench_tp.py --preset tiny --steps 2 --rounds 1      # a smoke test

Every configuration trains the same global batch per step (forward + backward + AdamW on random
tokens, after one warm-up step): one process with two threads; DDP over two processes (half the
batch each); TP over two processes (the whole batch on both, the model split).  Each process runs
one thread (two processes on two cores).  Rounds are interleaved and the median step reported.

Bytes per step are per rank and count the tensors handed to collectives (a ring all-reduce moves
about 2(n-1)/n times that over the wire):

* TP activations: every collective DTensor issues (``bitlm.tensor_parallel.CommBytes``: the
  row-parallel output all-reduces, the column-parallel input-gradient all-reduces, the vocab-parallel
  embedding all-reduce and logits all-gather) — the same in both modes;
* TP scales: the explicit scale collectives (``bitlm.tensor_parallel.comm_counts``) — zero in group
  mode by construction;
* DDP: the gradient all-reduce, every parameter's gradient once (fp32): the parameter bytes.

CPU tensor parallelism is not expected to win: the point is the comparison of the modes and an
honest record.  Writes a table to stdout and JSON (CPU model, load average, every number) to --json.
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

import torch

from bitlm.info import cpu_model

HERE = Path(__file__).resolve().parent
MODES = ("one", "ddp", "tp-group", "tp-global")


def measure(mode: str, preset_name: str, batch: int, seq: int, steps: int) -> dict:
    """Median seconds per step of ``mode`` (this rank of a torchrun job, or one process)."""
    from bitlm import parallel as P
    from bitlm import tensor_parallel as TP
    from bitlm.config import preset
    from bitlm.model import BitNetModel
    from bitlm.train import TrainConfig, lm_loss, make_optimizer

    tp = 2 if mode.startswith("tp") else 1
    d = P.init_distributed("cpu", "ddp" if mode == "ddp" else "none", tp=tp)
    cfg = preset(preset_name)
    if mode == "tp-group":
        cfg = TP.group_config(cfg, tp)
    torch.manual_seed(0)
    model = BitNetModel(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    P.apply_tensor_parallel(model, d)
    model = P.wrap_model(model, d)
    opt = make_optimizer(model, TrainConfig(recipe="fp").resolved(), 1e-8)
    rows = batch // d.dp_world  # DDP: half the global batch per rank; TP: all of it on every rank
    g = torch.Generator().manual_seed(d.dp_rank)
    times, act_bytes, scale_bytes, scale_calls, act_calls = [], [], [], [], []
    for i in range(steps + 1):
        tokens = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=g)
        TP.reset_comm_counts()
        t0 = time.perf_counter()
        with TP.CommBytes() as cb:
            lm_loss(model, tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
            c = TP.comm_counts()
            act_bytes.append(cb.bytes)
            act_calls.append(cb.calls)
            scale_bytes.append(c["bytes"])
            scale_calls.append(c["calls"])
    d.barrier()
    step = statistics.median(times)
    out = {"mode": mode, "preset": preset_name, "batch": batch, "seq": seq, "world": d.world, "tp": d.tp,
           "step_s": step, "tok_s": batch * seq / step, "threads": torch.get_num_threads(),
           "tp_activation_bytes": act_bytes[-1], "tp_activation_calls": act_calls[-1],
           "tp_scale_bytes": scale_bytes[-1], "tp_scale_calls": scale_calls[-1],
           "ddp_grad_bytes": n_params * 4 if mode == "ddp" else 0}
    out["bytes_per_step"] = out["tp_activation_bytes"] + out["tp_scale_bytes"] + out["ddp_grad_bytes"]
    d.close()
    return out


def _child(args, mode: str) -> dict:
    one = [__file__, "--one", mode, "--preset", args.preset, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps)]
    if mode == "one":
        cmd, env = [sys.executable, *one], {**os.environ, "OMP_NUM_THREADS": "2"}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *one]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"bench_tp: child failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=str(HERE / "results" / "tp.json"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        res = measure(args.one, args.preset, args.batch, args.seq, args.steps)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(res))
        return

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for mode in MODES:  # interleaved
            runs.setdefault(mode, []).append(_child(args, mode))
    load_after = os.getloadavg()
    rows = []
    for rs in runs.values():
        step = statistics.median(r["step_s"] for r in rs)
        rows.append({**rs[0], "step_s": step, "tok_s": args.batch * args.seq / step, "rounds": [r["step_s"] for r in rs]})
    ddp = next(r for r in rows if r["mode"] == "ddp")
    print(f"\n{cpu_model()} — torch {torch.__version__}; load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after (2 cores shared: timings pessimistic)")
    print(f"preset {args.preset}, global batch {args.batch} x {args.seq}, median of {args.rounds} rounds x "
          f"{args.steps} steps; bytes per rank per step handed to collectives")
    hdr = f"{'mode':<11}{'procs':>6}{'ms/step':>10}{'tok/s':>9}{'vs DDP':>8}{'act MB':>9}{'scale KB':>10}{'grad MB':>9}{'total MB':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['mode']:<11}{r['world']:>6}{r['step_s'] * 1e3:>10.0f}{r['tok_s']:>9.0f}"
              f"{ddp['step_s'] / r['step_s']:>8.2f}{r['tp_activation_bytes'] / 1e6:>9.2f}"
              f"{r['tp_scale_bytes'] / 1e3:>10.2f}{r['ddp_grad_bytes'] / 1e6:>9.2f}{r['bytes_per_step'] / 1e6:>10.2f}")
    g = next(r for r in rows if r["mode"] == "tp-global")
    print(f"\nscale collectives per step: global {g['tp_scale_calls']} calls / {g['tp_scale_bytes']:,} bytes; "
          f"group {next(r for r in rows if r['mode'] == 'tp-group')['tp_scale_calls']} calls")
    out = {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__, "loadavg_before": load_before,
           "loadavg_after": load_after, "preset": args.preset, "batch": args.batch, "seq": args.seq,
           "rounds": args.rounds, "steps": args.steps, "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    from bitlm.io.atomic import atomic_write_text

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(out, indent=2) + "\n")
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
