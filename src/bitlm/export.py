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
"""

from __future__ import annotations

import sys

__all__ = ["add_arguments", "run"]


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


def run(args) -> int:
    import torch

    from .loading import detect_format, load, load_tokenizer_for, save

    if detect_format(args.model) == "packed":  # inference-only: the latent weights are gone
        raise ValueError(f"{args.model}: a packed model cannot be exported; pass the checkpoint, "
                         "HF folder or GGUF it was packed from")
    model = load(args.model)
    try:
        tok = load_tokenizer_for(args.model, args.tokenizer)
    except FileNotFoundError:
        if args.tokenizer is not None:
            raise
        tok = getattr(model, "tokenizer", None)  # a GGUF's own vocabulary, if it had one
        if tok is None:
            print(f"bitlm export: note: no tokenizer found with {args.model}; exporting the model only",
                  file=sys.stderr)
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
