"""``bitlm demo`` / ``make demo``: the main job on the bundled corpus — the whole BitNet story.

Trains a BitNet b1.58 model and an fp model of the same shape on the same tokens of the default
corpus (public-domain books from Debian packages), packs the b1.58 model (i2 2-bit and t1
1.6-bit files), then measures side by side, in this process at one thread count:

* quality — validation perplexity and bits-per-byte (the packed models are scored themselves);
* size — bytes on disk (the packed files; the fp model's safetensors weights);
* speed — greedy decode and prefill tokens/s of the packed engine and of the fp model on the
  torch path (medians of interleaved rounds);
* memory — resident memory of each, measured in a fresh process that loads the model from disk
  and runs the same prefill + decode: the rise of its peak RSS (VmHWM) over its RSS before loading;
* energy — the arithmetic energy per token at 7 nm (``bitlm.energy``, the papers' model: FP16
  baseline, matrix products of the layers, head excluded).

It prints one table, greedy and seeded sampled samples from both models (``bitlm generate
--sample``'s defaults), the commands to try next, and writes the table as ``results.json`` beside
the checkpoints.  The default budget fits 2 CPU cores in about 10 minutes; ``--minutes`` scales it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

__all__ = ["add_arguments", "run"]

PROMPTS = ["It is a truth universally acknowledged", "And God said"]
SAMPLE_TOKENS = 40  # new tokens per sample
BENCH_DECODE = 64  # new tokens per decode measurement
BENCH_ROUNDS = 5  # interleaved rounds; the medians are reported


def add_arguments(p) -> None:
    p.add_argument("--out", default="runs/demo", help="where checkpoints and results go")
    p.add_argument("--minutes", type=float, default=3.4, help="training time per model, in minutes")
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
    import torch

    from . import kernels
    from .config import build_config
    from .data import count_token_bytes, prepare_data
    from .energy import estimate
    from .engine import convert, load_packed, save_packed
    from .evaluate import perplexity
    from .generate import SAMPLE_DEFAULTS, SamplingParams, generate
    from .info import cpu_model
    from .io.atomic import atomic_write_text
    from .train import TrainConfig, train

    for opt, v in (("--minutes", args.minutes), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len),
                   ("--max-steps", args.max_steps)):
        if v is not None and v <= 0:  # checked before the corpus is read and tokenised
            raise ValueError(f"{opt} must be positive, got {v}")
    t_start = time.time()
    out = Path(args.out)
    threads = torch.get_num_threads()
    kernels.set_num_threads(threads)  # the packed engine and torch at the same thread count
    kinfo = kernels.backend_info()
    print("bitlm demo: BitNet b1.58 vs fp on the bundled corpus "
          f"(torch {torch.__version__}, {threads} threads, kernels {kinfo.get('backend')}/{kinfo.get('tier')})")
    base = build_config(args.preset, overrides=args.overrides)
    data = prepare_data(args.data, vocab_size=base.vocab_size)
    st = data.stats
    print(f"corpus: {st.get('corpus')}: {st['train_tokens']:,} train / {st['val_tokens']:,} validation tokens "
          f"(byte-level BPE, vocab {data.tokenizer.vocab_size})")

    # Same tokens for both: step count fixed up front from a short timing of the slower model (b1.58).
    steps = args.max_steps
    if steps is None:
        steps = _fit_steps(base.replace(quant="b1.58"), data, args, budget_s=args.minutes * 60)
    t_setup = time.time()
    print(f"training {steps} steps x {args.batch_size} x {args.seq_len} tokens "
          f"= {steps * args.batch_size * args.seq_len:,} tokens per model\n")

    # Peak LRs from `bitlm experiment lr` at this scale (docs/results.md): fp is best near 3e-3, b1.58
    # near 1e-2 — BitNet tolerates (and wants) a several times higher LR, as the papers say
    runs = {"b1.58": dict(recipe="b1.58", lr=8e-3, lr2=5.3e-3), "fp": dict(recipe="fp", lr=3e-3)}
    trained = {}
    val_tokens = data.val
    n_val = min(len(val_tokens) - 1, 200_000)
    val_bytes = count_token_bytes(val_tokens[1 : n_val + 1], data.tokenizer)
    for quant, kw in runs.items():
        mcfg = base.replace(quant=quant)
        tcfg = TrainConfig(max_steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, eval_every=max(-(-steps // 4), 1),
                           eval_batches=8, out_dir=str(out / quant), progress=not args.no_progress, data=args.data, **kw)
        print(f"== {quant}: {mcfg.arch}, d={mcfg.d_model}, layers={mcfg.n_layers}, recipe {kw['recipe']} "
              f"(peak lr {kw['lr']:g})")
        res = train(mcfg, tcfg, data)
        trained[quant] = res
        print()

    t_train_end = time.time()
    # -- the packed files (what `bitlm pack` writes), and every model scored on the whole validation split
    b158, fp = trained["b1.58"].model.eval(), trained["fp"].model.eval()
    models: dict[str, dict] = {}
    for fmt in ("i2", "t1"):
        path = out / "b1.58" / f"model-{fmt}.bitlm"
        save_packed(convert(b158, fmt), path, tokenizer=data.tokenizer)
        pm = load_packed(path)
        models[f"b1.58-{fmt}"] = {"name": f"BitNet b1.58 {fmt}", "model": pm, "path": path, "disk": path.stat().st_size,
                                  "cfg": b158.config, "quant": "b1.58", "weight_bytes": pm.weight_bytes()}
    fp_dir = Path(trained["fp"].out_dir) / "last"
    models["fp"] = {"name": "fp (same shape)", "model": fp, "path": fp_dir, "cfg": fp.config, "quant": "fp",
                    "disk": sum(f.stat().st_size for f in fp_dir.glob("*.safetensors"))}
    prog = not args.no_progress
    for key, m in models.items():
        if key == "b1.58-t1" and _same_logits(models["b1.58-i2"]["model"], m["model"], val_tokens, args.seq_len):
            # t1 holds the very ternary codes and scales of i2 (only the bit layout differs): when both
            # files give the same logits, the i2 score is t1's — scoring the split again costs ~30 s
            ev = {k: models["b1.58-i2"][k] for k in ("ppl", "bpb", "val_tokens")}
            m.update(ev)
            continue
        ev = perplexity(m["model"], val_tokens[: n_val + 1], args.seq_len, batch_size=16, n_bytes=val_bytes, progress=prog)
        m["ppl"], m["bpb"], m["val_tokens"] = ev["ppl"], ev["bpb"], ev["tokens"]
    t_scored = time.time()

    # -- speed (this process, interleaved rounds), memory (a fresh process each), energy (bitlm.energy)
    print(f"measuring speed ({BENCH_ROUNDS} interleaved rounds, {threads} threads), memory and energy ...")
    n_new = min(BENCH_DECODE, base.max_seq_len // 2)
    n_prompt = min(args.seq_len, base.max_seq_len - n_new)
    prompt = [int(t) for t in val_tokens[:n_prompt]]
    speed = _bench({k: m["model"] for k, m in models.items()}, prompt, n_new, BENCH_ROUNDS)
    rows = []
    for key, m in models.items():
        mem = _memory_probe(m["path"], prompt, n_new, threads)
        e = estimate(m["cfg"], n_prompt + n_new, "7nm")
        torch_model = b158 if m["quant"] == "b1.58" else fp  # the packed file holds the same parameters, ternary
        rows.append({
            "model": m["name"], "key": key, "quant": m["quant"], "parameters": torch_model.num_parameters(),
            "linear_parameters": _linear_count(torch_model),
            "val_ppl": m["ppl"], "val_bpb": m["bpb"], "val_tokens": m["val_tokens"],
            "file": str(m["path"]), "bytes_on_disk": m["disk"],
            "decode_tok_s": speed[key]["decode_tok_s"], "prefill_tok_s": speed[key]["prefill_tok_s"],
            "memory_bytes": mem, "energy_j_per_token": e.total_j_per_token,
            "engine": "packed (native kernels)" if m["quant"] == "b1.58" else "torch",
            "weight_bytes": m.get("weight_bytes"),
        })
    t_measured = time.time()
    for r in rows:
        r.update(train_steps=steps, train_tokens=trained[r["quant"]].tokens, train_seconds=trained[r["quant"]].seconds)
    print()
    print(_table(rows))
    print(_table_notes(rows, n_prompt, n_new, threads))

    # -- samples: greedy, and seeded sampling with `bitlm generate --sample`'s defaults, same prompts.
    # One seed per prompt (`--seed i` for prompt i): with one shared seed the same random draws after
    # two prompts gave a barely trained model nearly the same continuation of both.
    sampled = SAMPLE_DEFAULTS
    seeds = [sampled.seed + i for i in range(len(PROMPTS))]
    samples: dict[str, dict[str, list[str]]] = {}
    for key, label in (("b1.58-i2", "BitNet b1.58 (packed i2)"), ("fp", "fp")):
        model = models[key]["model"]
        samples[key] = {
            "greedy": [p + generate(model, data.tokenizer, p, SAMPLE_TOKENS, SamplingParams()) for p in PROMPTS],
            "sampled": [p + generate(model, data.tokenizer, p, SAMPLE_TOKENS, replace(sampled, seed=sd))
                        for p, sd in zip(PROMPTS, seeds)],
        }
        for kind, texts in samples[key].items():
            how = "greedy" if kind == "greedy" else (f"sampled: temperature {sampled.temperature:g}, top-k {sampled.top_k}, "
                                                      f"top-p {sampled.top_p:g}, seeds {', '.join(map(str, seeds))} "
                                                      "(one per prompt)")
            print(f"\n-- {label}, {how}:")
            for t in texts:
                print("  " + " ".join(t.split()))

    # -- the table as JSON beside the checkpoints, and what to try next
    result = {
        "rows": rows, "samples": samples, "sampling": {"temperature": sampled.temperature, "top_k": sampled.top_k,
                                                       "top_p": sampled.top_p, "seed": sampled.seed, "seeds": seeds},
        "steps": steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "preset": args.preset,
        "bench": {"prompt_tokens": n_prompt, "decode_tokens": n_new, "rounds": BENCH_ROUNDS, "threads": threads,
                  "statistic": "median", "memory": "peak RSS rise of a fresh process loading the file and running "
                                                  "the same prefill + decode (VmHWM - VmRSS before loading)",
                  "energy": "bitlm.energy.estimate, 7nm, fp16 baseline, layers' matrix products, head excluded"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "kernels": {k: kinfo.get(k) for k in ("backend", "tier")},
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": time.time() - t_start,
        "phase_seconds": {"setup": t_setup - t_start, "training": t_train_end - t_setup, "scoring": t_scored - t_train_end,
                          "measuring": t_measured - t_scored, "samples": time.time() - t_measured},
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    i2 = models["b1.58-i2"]["path"]
    print(f"\nresults: {out / 'results.json'}; checkpoints: {out}/b1.58/last, {out}/fp/last; packed: {i2}, "
          f"{models['b1.58-t1']['path']}")
    print("next:")
    for cmd in (f"bitlm generate --model {i2} --prompt 'It is a truth' --sample",
                f"bitlm chat --model {i2}",
                f"bitlm eval --model {i2} --tasks arc_easy,hellaswag,piqa --limit 200",
                f"bitlm eval --model {out}/fp/last --tasks arc_easy,hellaswag,piqa --limit 200",
                f"bitlm serve --model {i2}"):
        print(f"  {cmd}")
    ph = result["phase_seconds"]
    print(f"total time {time.time() - t_start:.0f}s: set-up {ph['setup']:.0f}s (corpus, tokenizer, step timing), "
          f"training {ph['training']:.0f}s, packing and scoring {ph['scoring']:.0f}s, speed/memory {ph['measuring']:.0f}s, "
          f"samples {ph['samples']:.0f}s")
    return 0


def _same_logits(a, b, tokens, seq_len: int) -> bool:
    import torch

    rows = max(1, min(4, (len(tokens) - 1) // seq_len))
    n = min(seq_len, len(tokens))
    x = torch.as_tensor([[int(t) for t in tokens[r * n : (r + 1) * n]] for r in range(rows)], dtype=torch.long)
    with torch.inference_mode():
        return torch.allclose(a(x), b(x), rtol=1e-5, atol=1e-4)


def _bench(models: dict, prompt: list[int], n_new: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median prefill and greedy decode tokens/s of each model, interleaved round by round so a
    shared machine's load changes hit every model alike; one untimed warm-up call each."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.long)

    def once(model) -> tuple[float, float]:
        cache = model.new_cache(1, max_len=len(prompt) + n_new)
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)[:, -1]
        t1 = time.perf_counter()
        nxt = logits.argmax(-1, keepdim=True)
        for _ in range(n_new - 1):
            nxt = model(nxt.view(1, 1), cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1)

    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    with torch.inference_mode():
        for model in models.values():
            once(model)
        for _ in range(rounds):
            for k, model in models.items():
                times[k].append(once(model))
    return {k: {"prefill_tok_s": statistics.median(t[0] for t in v), "decode_tok_s": statistics.median(t[1] for t in v)}
            for k, v in times.items()}


def _memory_probe(path: Path, prompt: list[int], n_new: int, threads: int) -> int | None:
    """Resident memory of ``path`` in use: a fresh process (torch and bitlm imported) loads it with
    ``bitlm.load`` and runs the prefill + greedy decode; the rise of its peak RSS over its RSS
    before loading, in bytes (None where /proc is missing or the probe fails)."""
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS=str(threads), BITLM_NUM_THREADS=str(threads))
    arg = json.dumps({"path": str(path), "prompt": prompt, "n_new": n_new})
    try:
        r = subprocess.run([sys.executable, "-c", "import sys; from bitlm.demo import _probe_main; _probe_main(sys.argv[1])",
                            arg], env=env, capture_output=True, text=True, timeout=300)
        return int(json.loads(r.stdout.strip().splitlines()[-1])["bytes"]) if r.returncode == 0 else None
    except (OSError, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
        return None


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _probe_main(arg: str) -> None:
    """The memory probe's child process (see ``_memory_probe``); prints ``{"bytes": n}``."""
    import torch

    from .loading import load

    a = json.loads(arg)
    ids = torch.tensor([a["prompt"]], dtype=torch.long)
    try:  # reset the peak to the current RSS (Linux >= 4.0); else the peak so far is only imports
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = _status_kb("VmRSS")
    model = load(a["path"])
    model.eval()
    with torch.inference_mode():
        cache = model.new_cache(1, max_len=ids.shape[1] + a["n_new"])
        nxt = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for _ in range(a["n_new"] - 1):
            nxt = model(nxt.view(1, 1), cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    print(json.dumps({"bytes": (_status_kb("VmHWM") - before) * 1024}))


def _fit_steps(mcfg, data, args, budget_s: float) -> int:
    """Size both runs to ``budget_s`` each from a timed b1.58 training step (the slower model)."""
    from .train import time_train_step

    per_step = time_train_step(mcfg, data, args.batch_size, args.seq_len)
    # evaluation passes and the noise of a shared machine cost about 15 % on top of training
    return max(20, int(budget_s / (per_step * 1.15)))


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e-3, "m"), (1e-6, "µ"), (1e-9, "n"), (1e-12, "p")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def _table(rows) -> str:
    def mb(b):
        return "-" if b is None else f"{b / 1e6:.2f} MB"

    head = (f"{'model':<18}{'params':>8}{'val ppl':>9}{'val bpb':>8}{'on disk':>10}{'decode':>10}{'prefill':>10}"
            f"{'memory':>10}{'energy/tok':>12}")
    lines = [head, f"{'':<18}{'':>8}{'':>9}{'':>8}{'':>10}{'tok/s':>10}{'tok/s':>10}{'RSS':>10}{'7 nm':>12}",
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<18}{r['parameters'] / 1e6:>7.2f}M{r['val_ppl']:>9.2f}{r['val_bpb']:>8.3f}"
                     f"{mb(r['bytes_on_disk']):>10}{r['decode_tok_s']:>10,.0f}{r['prefill_tok_s']:>10,.0f}"
                     f"{mb(r['memory_bytes']):>10}{_si(r['energy_j_per_token'], 'J'):>12}")
    return "\n".join(lines)


def _table_notes(rows, n_prompt: int, n_new: int, threads: int) -> str:
    by = {r["key"]: r for r in rows}
    notes = [f"b1.58 rows: the packed files on the native engine; fp: the torch path. Speed: medians of {BENCH_ROUNDS} "
             f"interleaved rounds, prefill of {n_prompt} tokens, greedy decode of {n_new}, {threads} threads.",
             "memory: peak RSS rise of a fresh process loading the file and running the same prefill + decode.",
             "energy: arithmetic of the layers' matrix products per token at 7 nm (bitlm.energy: FP16 baseline, "
             "head excluded, as in the papers)."]
    b, f = by.get("b1.58-i2"), by.get("fp")
    if b and b.get("weight_bytes"):
        wb = b["weight_bytes"]
        dense = wb["embedding"] + wb["head"]
        notes.append(f"on disk: the i2 file holds {wb['linear'] / 1e6:.2f} MB of ternary linear weights "
                     f"({8 * wb['linear'] / b['linear_parameters']:.2f} bits each, fp32: "
                     f"{4 * b['linear_parameters'] / 1e6:.2f} MB) and {dense / 1e6:.2f} MB of f32 embedding and head, "
                     "which dominate at this size (`bitlm pack --head int8` shrinks them).")
    if b and f:
        parts = [f"{f['bytes_on_disk'] / b['bytes_on_disk']:.1f}x smaller on disk",
                 f"{b['decode_tok_s'] / f['decode_tok_s']:.1f}x decode speed"]
        if b["memory_bytes"] and f["memory_bytes"]:
            parts.append(_memory_ratio(f["memory_bytes"], b["memory_bytes"]))
        parts.append(f"{f['energy_j_per_token'] / b['energy_j_per_token']:.1f}x less energy per token")
        notes.append("b1.58 i2 vs fp: " + ", ".join(parts) + ".")
    return "\n".join(notes)


def _memory_ratio(fp_bytes: float, b_bytes: float) -> str:
    """fp's memory over b1.58's in words: "1.8x less memory", "about the same memory" within 5 %
    (a tiny model's RSS rise is mostly the runtime's), or "1.2x more memory"."""
    r = fp_bytes / b_bytes
    if r >= 1.05:
        return f"{r:.1f}x less memory"
    if r <= 1 / 1.05:
        return f"{1 / r:.1f}x more memory"
    return "about the same memory"
