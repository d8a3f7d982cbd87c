"""Model files in and out: ``bitlm.load`` / ``bitlm.save`` pick the format and hand the work to
the module that owns it.

    native   a bitlm checkpoint folder (``io.checkpoint``; a LoRA run's adapters via ``bitlm.lora``)
    dcp      a distributed bitlm checkpoint (``io.dcp``: torch.distributed.checkpoint shards of any
             world size), read into one process
    hf       a Hugging Face BitNetForCausalLM folder (``io.hf``), or a Llama / Mistral / Qwen2
             folder, converted to BitNet b1.58 with the weights copied (``bitlm.convert``)
    gguf     a llama.cpp GGUF file (``io.gguf``)
    packed   a ``.bitlm`` packed model file (``io.packed``, mapped into ``bitlm.engine.PackedModel``)

This dispatch sits above ``bitlm.io`` (the formats) and the modules that build models from them
(engine, convert, lora); nothing in ``bitlm.io`` imports it or them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import read_json

__all__ = ["load", "save", "detect_format", "load_tokenizer_for"]


def detect_format(path: str | Path) -> str:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(8)
        if magic[:4] == b"GGUF":
            return "gguf"
        if magic[:8] == b"BITLMPAK":  # io.packed.MAGIC (not imported: it would load torch)
            return "packed"
        raise ValueError(f"{p}: unrecognised model file (not GGUF, not a bitlm packed model)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ValueError(f"{p}: folder has no config.json (not a bitlm checkpoint or Hugging Face model)")
    meta = read_json(cfg)
    if isinstance(meta, dict) and meta.get("format") == "bitlm-checkpoint":
        return "native"
    if isinstance(meta, dict) and meta.get("format") == "bitlm-dcp":  # io.dcp.FORMAT
        return "dcp"
    return "hf"


def load(path: str | Path, **kw: Any):
    """Load a model from a bitlm checkpoint folder, a Hugging Face folder, a GGUF or packed file."""
    fmt = detect_format(path)
    if fmt == "native":
        from .io.checkpoint import load_checkpoint

        model = load_checkpoint(path, **kw)[0]
        if (Path(path) / "adapter.safetensors").is_file():  # a LoRA run: the base plus its adapters
            from .lora import load_lora

            load_lora(model, path)
        return model
    if fmt == "dcp":
        from .io.dcp import load_dcp_model

        return load_dcp_model(path)[0]
    if fmt == "hf":
        from .convert import convert_llama, is_llama_family

        if is_llama_family(path):  # Llama / Mistral / Qwen2: converted to BitNet b1.58 for QAT
            return convert_llama(path, **kw)
        from .io.hf import load_hf

        return load_hf(path, **kw)
    if fmt == "gguf":
        from .io.gguf import load_gguf

        return load_gguf(path, **kw)
    from .engine import load_packed

    return load_packed(path, **kw)


def save(model, path: str | Path, format: str = "native", *, requantize: bool = False, val_tokens=None, **kw: Any):
    """Save ``model`` as ``native`` (checkpoint folder), ``hf`` (folder) or ``gguf`` (file).
    ``requantize=True``: save a copy without group options, one scale per tensor
    (``bitlm.export.requantize``), printing the validation loss change on ``val_tokens``."""
    if format in ("hf", "gguf"):
        from .lora import refuse_adapters

        refuse_adapters(model, "an HF folder" if format == "hf" else "a GGUF file")
    if requantize:
        from .export import requantize as requantize_groups

        model, report = requantize_groups(model, val_tokens)
        print(report)
    if format == "native":
        from .io.checkpoint import save_checkpoint

        return save_checkpoint(model, path, **kw)
    if format == "hf":
        from .io.hf import save_hf

        return save_hf(model, path, **kw)
    if format == "gguf":
        from .io.gguf import save_gguf

        return save_gguf(model, path, **kw)
    raise ValueError(f"unknown format {format!r}; choose native, hf or gguf")


def load_tokenizer_for(model_path: str | Path, explicit: str | Path | None = None):
    """The tokenizer to use with ``model_path``: ``explicit`` if given, else the tokenizer.json
    stored with the model (in its folder, or beside a single-file model as <name>.tokenizer.json)."""
    from .data import load_tokenizer

    if explicit is not None:
        return load_tokenizer(explicit)
    p = Path(model_path)
    if p.is_file() and detect_format(p) == "packed":
        from .io.packed import read_header

        tok_json = read_header(p).get("tokenizer")
        if tok_json:
            from tokenizers import Tokenizer as HFTokenizer

            from .data import Tokenizer

            return Tokenizer(HFTokenizer.from_str(tok_json))
    candidates = [p / "tokenizer.json"] if p.is_dir() else [p.with_suffix(".tokenizer.json"), p.parent / "tokenizer.json"]
    for c in candidates:
        if c.is_file():
            return load_tokenizer(c)
    if p.is_file() and detect_format(p) == "gguf":  # no sidecar: rebuild it from the GGUF vocabulary
        from .io.gguf import gguf_tokenizer

        tok = gguf_tokenizer(p)
        if tok is not None:
            return tok
    raise FileNotFoundError(f"{p}: no tokenizer found with the model (looked for {', '.join(map(str, candidates))}); "
                            "pass --tokenizer")
