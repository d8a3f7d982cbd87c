"""``bitlm`` command line: one verb → one library call.

Each verb lives in the module that owns the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``, registered in ``VERBS`` below.  Modules are
imported only when their verb runs, so ``bitlm --help`` stays fast.

Errors that are the user's (bad file, bad option) are raised as ``BitlmError`` (or ValueError /
FileNotFoundError) and printed as one line ``bitlm <verb>: error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("bitlm.train", "train or fine-tune a model (QAT recipes b1, b1.58, fp)"),
    "eval": ("bitlm.evaluate", "loss / perplexity / bits-per-byte, and zero-shot tasks"),
    "generate": ("bitlm.generate", "generate text from a prompt"),
    "info": ("bitlm.info", "model, parameter count, bits, environment and kernel backend"),
    "pack": ("bitlm.engine", "pack a trained model into a memory-mapped file for the fast CPU engine"),
    "chat": ("bitlm.chat", "multi-turn chat on stdin/stdout (packed engine when given a packed file)"),
    "demo": ("bitlm.demo", "train BitNet b1.58 and fp on the bundled corpus and compare them"),
    "convert": ("bitlm.convert", "convert a Llama / Mistral / Qwen2 HF folder to a BitNet b1.58 checkpoint for QAT"),
    "energy": ("bitlm.energy", "arithmetic energy of a forward pass (BitNet 2310.11453 §2.3, Table 1)"),
    "export": ("bitlm.export", "write a model as a llama.cpp GGUF file or a Hugging Face folder"),
    "experiment": ("bitlm.experiments", "re-run the papers' comparisons at CPU scale: compare, ptq, scaling, lr"),
}


class BitlmError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitlm", description="BitNet 1-bit / 1.58-bit language models")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_mod, help_) in VERBS.items():
        sub.add_parser(verb, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    # OMP_WAIT_POLICY=PASSIVE is already set: importing bitlm.cli runs bitlm/__init__.py first.
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    verb = argv[0]
    if verb not in VERBS:
        parser.error(f"unknown verb {verb!r}; choose one of {', '.join(VERBS)}")
    mod = importlib.import_module(VERBS[verb][0])
    vp = argparse.ArgumentParser(prog=f"bitlm {verb}", description=VERBS[verb][1])
    mod.add_arguments(vp)
    args = vp.parse_args(argv[1:])
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print(f"bitlm {verb}: interrupted", file=sys.stderr)
        return 130
    except (BitlmError, ValueError, OSError) as e:
        if os.environ.get("BITLM_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"bitlm {verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
