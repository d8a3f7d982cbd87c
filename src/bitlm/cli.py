"""``bitlm`` command line: one verb → one library call.

Each verb lives in the module that owns the work; that module exposes
``add_arguments(parser)`` and ``run(args) -> int``, registered in ``VERBS`` below.  Modules are
imported only when their verb runs, so ``bitlm --help`` stays fast.

Errors that are the user's (bad file, bad option) are raised as ``BitlmError`` (or ValueError /
FileNotFoundError) and printed as one line ``bitlm <verb>: error: ...`` with exit status 2; so is
a missing optional package (``ModuleNotFoundError`` naming one of ``OPTIONAL_PACKAGES``), with
the extra that installs it.  Anything else is a bug in bitlm: one line ``bitlm <verb>: internal
error: ...`` and exit status 1, or the full traceback with ``BITLM_DEBUG=1``.  argparse's own
errors (unknown option, bad choice) keep its usage message and exit status 2.  Warnings print
as one line ``bitlm <verb>: warning: ...`` (not Python's ``file:line: UserWarning`` and a line of
bitlm's source).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

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
    "serve": ("bitlm.serve", "OpenAI-compatible HTTP server with continuous batching (chat, completions, streaming)"),
    "data": ("bitlm.data.shards", "tokenize a corpus once into memory-mapped token shards (bitlm data prepare)"),
    "checkpoint": ("bitlm.checkpoints", "consolidate a distributed (multi-rank) checkpoint into one native checkpoint"),
    "experiment": ("bitlm.experiments", "re-run the papers' comparisons at CPU scale: compare, ptq, scaling, lr"),
}


# import name of an optional package -> the extra in pyproject.toml that installs it
OPTIONAL_PACKAGES: dict[str, str] = {
    "transformers": "hf",
    "accelerate": "hf",
    "gguf": "gguf",
    "lm_eval": "eval",
    "matplotlib": "plot",
    "datasets": "datasets",
    "pyarrow": "datasets",
    "llama_cpp": "llama",
    "fastapi": "serve",
    "uvicorn": "serve",
    "starlette": "serve",
    "pydantic": "serve",
    "jinja2": "serve",
}
# bitlm's own dependencies (pyproject.toml [project] dependencies), by import name
REQUIRED_PACKAGES = ("torch", "numpy", "safetensors", "tokenizers", "tqdm")


class BitlmError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# exceptions whose message is written for the user (bad file, bad option, diverged run)
USER_ERRORS = (BitlmError, ValueError, OSError, FloatingPointError)


def missing_package_message(e: ImportError) -> str | None:
    """One line for an ImportError that means "a package is not installed", else None."""
    if not isinstance(e, ModuleNotFoundError) or not e.name:
        return None
    root = e.name.split(".")[0]
    if root in OPTIONAL_PACKAGES:
        return (f"this needs the optional package '{root}', which is not installed: "
                f"pip install 'bitlm[{OPTIONAL_PACKAGES[root]}]'")
    if root in REQUIRED_PACKAGES:
        return f"bitlm's dependency '{root}' is not installed: pip install 'bitlm' (or pip install {root})"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    debug = bool(os.environ.get("BITLM_DEBUG"))
    python_format = warnings.formatwarning  # used only when a warning is printed, never when recorded
    if not debug:
        warnings.formatwarning = lambda message, category, filename, lineno, line=None: (
            f"bitlm {verb}: warning: {message}\n")
    try:
        mod = importlib.import_module(VERBS[verb][0])
        vp = argparse.ArgumentParser(prog=f"bitlm {verb}", description=VERBS[verb][1])
        mod.add_arguments(vp)
        args = vp.parse_args(argv[1:])  # SystemExit(2) with usage on a bad option: not caught below
        args.argv = argv[1:]  # the verb's own options as given (bitlm train --nproc re-executes them)
        return int(mod.run(args) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C, or training's SIGINT/SIGTERM handler (which carries .signum)
        print(f"bitlm {verb}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 128 + int(getattr(e, "signum", 2))
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"bitlm {verb}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except ImportError as e:
        if debug:
            raise
        msg = missing_package_message(e)
        if msg is not None:
            print(f"bitlm {verb}: error: {msg}", file=sys.stderr)
            return 2
        _internal_error(verb, e)
        return 1
    except Exception as e:  # a bug in bitlm: say so in one line, keep the traceback for BITLM_DEBUG=1
        if debug:
            raise
        _internal_error(verb, e)
        return 1
    finally:
        warnings.formatwarning = python_format


def _internal_error(verb: str, e: BaseException) -> None:
    print(f"bitlm {verb}: internal error: {type(e).__name__}: {_first_line(e)} "
          "(set BITLM_DEBUG=1 for the traceback; please report it)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
