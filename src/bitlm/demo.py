"""``bitlm demo`` / ``make demo``: the main job on the bundled corpus.

Trains a BitNet b1.58 model and an fp model of the same shape on the same tokens of the default
corpus (public-domain books from Debian packages), then prints a comparison table — parameters,
validation perplexity and bits-per-byte, bytes of the linear weights as trained (fp32 latent) vs as
ternary (i2 2-bit and t1 1.6-bit packing) — and a greedy sample from each model.

The default budget fits 2 CPU cores in about 10 minutes in total; ``--minutes`` scales it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]

PROMPTS = ["It is a truth universally acknowledged", "And God said"]


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where checkpoints and results go")
    p.add_argument("--minutes", type=float, default=3.6, help="training time per model, in minutes")
    p.add_argument("--preset", default="small")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=None, help="fixed step count (default: fit --minutes)")
    p.add_argument("--data", default="default")
    p.add_argument("--no-progress", action="store_true")


def _linear_count(model) -> int:
    from .model import linear_modules

    return sum(m.weight.numel() for _, m in linear_modules(model))


def run(args) -> int:
    import os

    import torch

    from .config import build_config
    from .data import count_token_bytes, prepare_data
    from .evaluate import perplexity
    from .generate import SamplingParams, generate
    from .train import TrainConfig, train

    for opt, v in (("--minutes", args.minutes), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                   ("--max-steps", args.max_steps)):
        if v is not None and v <= 0:  # checked before the corpus is read and tokenised
            raise ValueError(f"{opt} must be positive, got {v}")
    t_start = time.time()
    out = Path(args.out)
    print("bitlm demo: BitNet b1.58 vs fp on the bundled corpus "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
    base = build_config(args.preset, overrides=args.overrides)
    data = prepare_data(args.data, vocab_size=base.vocab_size)
    st = data.stats
    print(f"corpus: {st.get('corpus')}: {st['train_tokens']:,} train / {st['val_tokens']:,} validation tokens "
          f"(byte-level BPE, vocab {data.tokenizer.vocab_size})")

    # Same tokens for both: step count fixed up front from a short timing of the slower model (b1.58).
    steps = args.max_steps
    if steps is None:
        steps = _fit_steps(base.replace(quant="b1.58"), data, args, budget_s=args.minutes * 60)
    print(f"training {steps} steps x {args.batch_size} x {args.seq_len} tokens "
          f"= {steps * args.batch_size * args.seq_len:,} tokens per model\n")

    # Peak LRs from `bitlm experiment lr` at this scale (docs/results.md): fp is best near 3e-3, b1.58
    # near 1e-2 — BitNet tolerates (and wants) a several times higher LR, as the papers say
    runs = {"b1.58": dict(recipe="b1.58", lr=8e-3, lr2=5.3e-3), "fp": dict(recipe="fp", lr=3e-3)}
    rows, samples = [], {}
    val_tokens = data.val
    n_val = min(len(val_tokens) - 1, 200_000)
    val_bytes = count_token_bytes(val_tokens[1 : n_val + 1], data.tokenizer)
    for quant, kw in runs.items():
        mcfg = base.replace(quant=quant)
        tcfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=max(steps // 4, 1),
                           eval_batches=8, out_dir=str(out / quant), progress=not (args.no_progress or os.environ.get("CI")),
                           data=args.data, **kw)
        print(f"== {quant}: {mcfg.arch}, d={mcfg.d_model}, layers={mcfg.n_layers}, recipe {kw['recipe']} "
              f"(peak lr {kw['lr']:g})")
        res = train(mcfg, tcfg, data)
        model = res.model.eval()
        ev = perplexity(model, val_tokens[: n_val + 1], args.seq_len, batch_size=16, n_bytes=val_bytes)
        n_lin = _linear_count(model)
        rows.append({
            "model": "BitNet b1.58" if quant == "b1.58" else "fp (same shape)",
            "quant": quant, "parameters": model.num_parameters(), "linear_parameters": n_lin,
            "val_ppl": ev["ppl"], "val_bpb": ev["bpb"], "val_tokens": ev["tokens"],
            "linear_bytes_trained": n_lin * 4,
            "linear_bytes_i2": n_lin * 2 // 8 if quant != "fp" else None,
            "linear_bytes_t1": (n_lin * 8 + 39) // 40 if quant != "fp" else None,
            "linear_bytes_bf16": n_lin * 2,
            "train_seconds": res.seconds, "tokens": res.tokens,
        })
        samples[quant] = [p + generate(model, data.tokenizer, p, 40, SamplingParams()) for p in PROMPTS]
        print()

    print(_table(rows))
    for quant, texts in samples.items():
        print(f"\n-- greedy samples, {quant}:")
        for t in texts:
            print("  " + " ".join(t.split()))
    from .io.atomic import atomic_write_text

    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "samples": samples, "steps": steps,
                                                        "seconds": time.time() - t_start}, indent=2) + "\n")
    print(f"\nresults: {out / 'results.json'}; checkpoints: {out}/b1.58/last, {out}/fp/last "
          f"(try: bitlm generate --model {out}/b1.58/last --prompt 'It is')")
    print(f"total time {time.time() - t_start:.0f}s")
    return 0


def _fit_steps(mcfg, data, args, budget_s: float) -> int:
    """Size both runs to ``budget_s`` each from a timed b1.58 training step (the slower model)."""
    from .train import time_train_step

    per_step = time_train_step(mcfg, data, args.batch_size, args.seq_len)
    # evaluation passes and the noise of a shared machine cost about 15 % on top of training
    return max(20, int(budget_s / (per_step * 1.15)))


def _table(rows) -> str:
    def mb(b):
        return "-" if b is None else f"{b / 1e6:.2f} MB"

    head = f"{'model':<18}{'params':>11}{'val ppl':>9}{'val bpb':>9}{'linear fp32':>13}{'ternary i2':>12}{'ternary t1':>12}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18}{r['parameters'] / 1e6:>10.2f}M{r['val_ppl']:>9.2f}{r['val_bpb']:>9.3f}"
                     f"{mb(r['linear_bytes_trained']):>13}{mb(r['linear_bytes_i2']):>12}{mb(r['linear_bytes_t1']):>12}")
    return "\n".join(lines)
