"""``bitlm export``: write a model in another runtime's format.

    bitlm export --model PATH --format gguf|hf --out PATH
                 [--gguf-type tq2_0|tq1_0|i2_s|iq2_bn|iq2_bn_r4|iq1_bn]
                 [--head-type f16|f32|q8_0] [--dtype auto|bfloat16|float16|float32] [--tokenizer PATH]

``--model`` is anything ``bitlm.load`` reads (a native checkpoint folder, a Hugging Face
BitNetForCausalLM folder, a GGUF file).  ``gguf`` writes a GGUF file (``bitlm.io.gguf.save_gguf``)
whose ternary type picks the runtime: TQ2_0 / TQ1_0 for llama.cpp (architecture ``bitnet``),
I2_S for bitnet.cpp, IQ2_BN / IQ2_BN_R4 / IQ1_BN for ik_llama.cpp (ReLU² models in the runtimes'
``bitnet-b1.58`` / ``bitnet-25`` architectures); docs/gguf.md says which runtime computes what.  ``hf`` a
packed BitNetForCausalLM folder (``bitlm.io.hf.save_hf``).  The tokenizer stored with the model
(or ``--tokenizer``) goes along: into the GGUF vocabulary and ``<out>.tokenizer.json``, or into
the HF folder; without one the export still works, with a note on stderr.

Group quantisation (``weight_groups`` > 1, ``act_groups``, ``norm_groups``; 2310.11453 Eq. 13-15)
is refused by formats that cannot hold it, naming the option (docs/gguf.md says what GGUF holds).
``--requantize`` instead exports a copy with every group option off — the same latent weights
re-quantised with one scale per tensor, activations and norms over all features (:func:`requantize`)
— and prints the validation loss before and after on ``--val-data`` (``--val-tokens`` tokens).
"""

from __future__ import annotations

import sys

__all__ = ["add_arguments", "run", "requantize", "GROUP_OPTIONS"]

#: The config fields of group quantisation / normalisation and their ungrouped values.
GROUP_OPTIONS = {"weight_groups": 1, "weight_group_dim": "out", "act_groups": 1, "norm_groups": 1, "group_scope": "all"}


def requantize(model, tokens=None, seq_len: int | None = None, max_tokens: int | None = None):
    """``model`` without its group options: a new model whose config has every
    :data:`GROUP_OPTIONS` field at its ungrouped value, holding the same latent weights (so each
    projection re-quantises with one absmean scale per tensor, activations with one absmax per
    token, norms over all features).  Returns ``(model, report)``: the report names the options
    changed and, with ``tokens`` (a validation token sequence), the validation loss before and
    after (``bitlm.evaluate.perplexity``).  A model without groups comes back unchanged."""
    from .model import BitNetModel

    cfg = model.config
    flat = cfg.replace(**GROUP_OPTIONS)
    changed = [f"{k}={getattr(cfg, k)!r}" for k in GROUP_OPTIONS if getattr(cfg, k) != getattr(flat, k)]
    if not changed:
        return model, "requantize: the model has no group options; exported as is"
    if not isinstance(model, BitNetModel):
        raise ValueError(f"requantize needs a bitlm model with latent weights, got {type(model).__name__}")
    p = next(model.parameters())
    new = BitNetModel(flat).to(device=p.device, dtype=p.dtype)
    new.load_state_dict(model.state_dict())
    new.eval()
    report = f"requantized to one scale per tensor (was {', '.join(changed)})"
    if tokens is None:
        return new, report + "; validation loss not measured (no validation tokens: pass a tokenizer)"
    from .evaluate import perplexity

    before = perplexity(model, tokens, seq_len, max_tokens=max_tokens)
    after = perplexity(new, tokens, seq_len, max_tokens=max_tokens)
    d = after["loss"] - before["loss"]
    return new, (f"{report}: validation loss {before['loss']:.4f} -> {after['loss']:.4f} ({d:+.4f} nats/token, "
                 f"ppl {before['ppl']:.3f} -> {after['ppl']:.3f}, {after['tokens']} tokens)")


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder, HF folder or GGUF file")
    p.add_argument("--format", required=True, choices=("gguf", "hf"), help="output format")
    p.add_argument("--out", required=True, help="output file (gguf) or folder (hf)")
    p.add_argument("--gguf-type", "--ternary-type", dest="gguf_type", default="tq2_0",
                   choices=("tq2_0", "tq1_0", "i2_s", "iq2_bn", "iq2_bn_r4", "iq1_bn"),
                   help="GGUF ternary type: tq2_0 (default, 2.06 bpw) / tq1_0 (1.69) for llama.cpp, i2_s (2.0) for "
                        "bitnet.cpp, iq2_bn / iq2_bn_r4 (2.0) / iq1_bn (1.625) for ik_llama.cpp")
    p.add_argument("--head-type", default="f16", choices=("f16", "f32", "q8_0"),
                   help="GGUF storage of the embedding / output head")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="HF storage of embeddings, norms and scales: auto (default, lossless: the dtype the "
                        "model carries or its source folder stored) or a dtype (bfloat16 as Microsoft's release)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or folder (default: the model's own)")
    p.add_argument("--requantize", action="store_true",
                   help="a model with group quantisation / normalisation (weight_groups, act_groups, norm_groups): "
                        "export it with one scale per tensor instead of refusing, and print the validation loss change")
    p.add_argument("--val-data", default="default",
                   help="with --requantize: text whose validation split measures the loss change ('default', a "
                        ".txt/.jsonl/.parquet file, or hf:NAME)")
    p.add_argument("--val-tokens", type=int, default=16384, help="with --requantize: tokens scored (default 16384)")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run: fold its adapters into the ternary weights first (lossy; the loss is reported)")


def run(args) -> int:
    import torch

    from .loading import detect_format, load, load_tokenizer_for, save

    if detect_format(args.model) == "packed":  # inference-only: the latent weights are gone
        raise ValueError(f"{args.model}: a packed model cannot be exported; pass the checkpoint, "
                         "HF folder or GGUF it was packed from")
    if args.val_tokens < 2:
        raise ValueError(f"--val-tokens must be >= 2, got {args.val_tokens}")
    model = load(args.model)
    from .lora import merge_for_export, refuse_adapters

    if args.merge_lora:
        print(f"bitlm export: {merge_for_export(model)}")
    refuse_adapters(model, "an HF folder" if args.format == "hf" else "a GGUF file")  # before the tokenizer note
    try:
        tok = load_tokenizer_for(args.model, args.tokenizer)
    except FileNotFoundError:
        if args.tokenizer is not None:
            raise
        tok = getattr(model, "tokenizer", None)  # a GGUF's own vocabulary, if it had one
        if tok is None:
            print(f"bitlm export: note: no tokenizer found with {args.model}; exporting the model only",
                  file=sys.stderr)
    if args.requantize:
        tokens = None
        if tok is not None:
            from .data import load_text_source
            from .tasks import encode_text

            tokens = encode_text(tok, load_text_source(args.val_data).val_text)[: args.val_tokens + 1]
        model, report = requantize(model, tokens)
        print(f"bitlm export: {report}")
    if args.format == "gguf":
        out = save(model, args.out, format="gguf", ternary_type=args.gguf_type, tokenizer=tok,
                   head_type=args.head_type)
    else:
        ids = {} if tok is None else {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                      "pad_token_id": tok.pad_id}
        out = save(model, args.out, format="hf", tokenizer=None if tok is None else tok.backend,
                   dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), **ids)
    print(f"wrote {out}")
    return 0
