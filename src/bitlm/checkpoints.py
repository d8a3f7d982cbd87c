"""``bitlm checkpoint consolidate DIR --out OUT``: a distributed checkpoint (``bitlm.io.dcp``, the
shards of any number of ranks) read into one process and written as a native checkpoint
(``bitlm.io.checkpoint``) with its tokenizer, step and train config — what tools outside bitlm
that read safetensors want.  (``bitlm.load``, ``bitlm pack`` and ``bitlm export`` read a
distributed checkpoint directly.)"""

from __future__ import annotations

from pathlib import Path


def consolidate(src: str | Path, out: str | Path) -> Path:
    from .io.checkpoint import save_checkpoint
    from .io.dcp import load_dcp_model

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ValueError(f"--out {out}: the same folder as the distributed checkpoint; choose another")
    model, meta = load_dcp_model(src)
    tok = None
    if meta.get("tokenizer") and (src / meta["tokenizer"]).is_file():
        from .data import load_tokenizer

        tok = load_tokenizer(src / meta["tokenizer"])
    extra = {k: v for k, v in meta.items() if k in ("recipe", "world_size", "parallel")}
    return save_checkpoint(model, out, train_config=meta.get("train"), step=int(meta.get("step", 0)),
                           tokenizer=tok, extra={"consolidated_from": str(src), **extra})


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("consolidate", help="write a distributed checkpoint as one native checkpoint folder")
    c.add_argument("checkpoint", help="distributed checkpoint folder (OUT/last of a --parallel run)")
    c.add_argument("--out", required=True, help="native checkpoint folder to write")


def run(args) -> int:
    path = consolidate(args.checkpoint, args.out)
    print(f"wrote {path}")
    return 0
