"""Evaluation: loss, perplexity and bits-per-byte on a text or the validation split, and the
zero-shot (or ``--num-fewshot`` K-shot) multiple-choice tasks of the BitNet papers (``bitlm.tasks``).

Perplexity is computed over non-overlapping windows of the model's context (every token scored
once, the first token of each window without context, as nanoGPT/llm.c do); bits-per-byte is
total NLL / (ln 2 · UTF-8 bytes of the scored text), which makes models with different
tokenizers comparable.

BOS: the text is scored as one document.  When the tokenizer puts a BOS in front of a text
(Llama-3 / BitNet 2B4T ``<|begin_of_text|>``, ``Tokenizer.add_bos``), the token stream is
``[BOS] + encode(text)``: the first window starts with the BOS, the BOS itself is not scored, and
every token of the text is (the first one given the BOS).  Later windows continue the same
document, without another BOS.  bitlm's own tokenizers add none, so the first text token is the
first window's unscored context, as before.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .generate import add_device_argument, add_head_act_argument, load_for_generation

__all__ = ["perplexity", "add_arguments", "run"]


@torch.no_grad()
def perplexity(
    model, tokens: np.ndarray | list[int], seq_len: int | None = None, batch_size: int = 8,
    max_tokens: int | None = None, n_bytes: int | None = None, progress: bool = False,
) -> dict[str, float]:
    """Score ``tokens`` in non-overlapping windows: returns loss (nats/token), ppl, tokens, and
    bpb when ``n_bytes`` (UTF-8 bytes of the scored text) is given."""
    from .data.common import progress as progress_bar

    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    arr = np.asarray(tokens, dtype=np.int64)
    if max_tokens is not None:
        arr = arr[: max_tokens + 1]
    if arr.size < 2:
        raise ValueError("need at least 2 tokens to compute a loss")
    if arr.max() >= model.config.vocab_size:
        raise ValueError(f"token id {int(arr.max())} is outside the model's vocabulary of {model.config.vocab_size}")
    starts = range(0, arr.size - 1, seq_len)
    full = [s for s in starts if s + seq_len <= arr.size - 1]  # whole windows are batched
    tail = [s for s in starts if s + seq_len > arr.size - 1]  # at most one short window
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[s] for s in tail]
    from .generate import model_device

    dev = model_device(model)
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    for chunk in progress_bar(batches, enabled=progress, desc="eval", unit="batch"):
        n = min(seq_len, arr.size - 1 - chunk[0])
        x = torch.from_numpy(np.stack([arr[s : s + n] for s in chunk])).to(dev)  # (B, n)
        y = torch.from_numpy(np.stack([arr[s + 1 : s + 1 + n] for s in chunk])).to(dev)
        logits = model(x)
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was)
    loss = nll / count
    out = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
    if n_bytes:
        out["bpb"] = nll / (math.log(2) * n_bytes)
        out["bytes"] = n_bytes
    return out


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, HF folder, GGUF or packed model file")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or HF folder (default: the model's own)")
    p.add_argument("--data", default="default",
                   help="'default' (the bundled corpus's validation split), a .txt/.jsonl/.parquet file, or hf:NAME")
    p.add_argument("--text", default=None, help="score this literal text instead of --data")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--seq-len", type=int, default=None)
    add_device_argument(p)
    p.add_argument("--tasks", default=None, help="comma-separated zero-shot tasks (arc_easy,hellaswag,...) or 'all'")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K",
                   help="K labelled examples before each task item, sampled as lm-eval-harness does (its seeded "
                        "sampler, separators and exclusion rule; from the evaluation split, the only one the data "
                        "ships; see bitlm.tasks). Default 0 (zero-shot)")
    p.add_argument("--fewshot-seed", type=int, default=None,
                   help="seed of the few-shot sampler (default 1234, lm-eval's fewshot_random_seed)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    add_head_act_argument(p)


def run(args) -> int:
    from .data import count_token_bytes
    from .loading import load_tokenizer_for

    for opt, v, least in (("--seq-len", args.seq_len, 1), ("--batch-size", args.batch_size, 1),
                          ("--max-tokens", args.max_tokens, 1), ("--limit", args.limit, 1),
                          ("--num-fewshot", args.num_fewshot, 0)):
        if v is not None and v < least:
            raise ValueError(f"{opt} must be >= {least}, got {v}")
    if (args.num_fewshot or args.fewshot_seed is not None) and not args.tasks:
        raise ValueError("--num-fewshot / --fewshot-seed apply to --tasks evaluation only")
    model = load_for_generation(args, auto_packed=False)  # auto: the torch model's exact numbers
    tok = load_tokenizer_for(args.model, args.tokenizer)
    results: dict[str, Any] = {"model": str(args.model)}
    if args.tasks:
        from .tasks import evaluate_tasks, parse_task_list

        names = parse_task_list(args.tasks)
        from .tasks import FEWSHOT_SEED

        res = evaluate_tasks(model, tok, names, limit=args.limit, batch_size=args.batch_size,
                             num_fewshot=args.num_fewshot,
                             fewshot_seed=FEWSHOT_SEED if args.fewshot_seed is None else args.fewshot_seed)
        results["tasks"] = res
        _print_tasks(res)
    else:
        if args.text is not None:
            text = args.text
        else:
            from .data import load_text_source

            text = load_text_source(args.data).val_text
        from .tasks import encode_text

        ids = encode_text(tok, text)  # a leading BOS where the tokenizer adds one (see the module doc)
        if args.max_tokens is not None:
            ids = ids[: args.max_tokens + 1]
        n_bytes = count_token_bytes(ids[1:], tok)  # UTF-8 bytes the scored tokens stand for
        r = perplexity(model, ids, args.seq_len, args.batch_size, n_bytes=n_bytes, progress=True)
        results["lm"] = r
        print(f"tokens {r['tokens']:,}  loss {r['loss']:.4f}  ppl {r['ppl']:.3f}  bpb {r['bpb']:.4f}")
    if args.json:
        from .io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


def _print_tasks(res: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in res.get("tasks", res).items() if isinstance(v, dict)]
    print(f"{'task':<16}{'n':>7}{'acc':>9}{'acc_norm':>10}")
    for name, v in rows:
        an = v.get("acc_norm")
        an_s = f"{an * 100:>9.2f}%" if an is not None else f"{'-':>10}"
        print(f"{name:<16}{v.get('n', 0):>7}{v.get('acc', float('nan')) * 100:>8.2f}%{an_s}")
    if "average" in res:
        print(f"{'average':<16}{'':>7}{res['average'] * 100:>8.2f}%")
