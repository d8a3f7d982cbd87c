"""bitlm's native checkpoint: a folder written atomically.

    <dir>/config.json          {"format": "bitlm-checkpoint", "version": 1, "model": ModelConfig,
                                "train": {...} | null, "step": int, "tokenizer": "tokenizer.json" | null}
    <dir>/model.safetensors    parameters (latent high-precision weights; tied lm_head omitted)
    <dir>/optimizer.pt         optimizer + scheduler state for resuming (training checkpoints only)
    <dir>/tokenizer.json       the tokenizer the model was trained with (when known)

Writes go to a sibling temp folder that is renamed into place, so a crash never leaves a
half-written checkpoint.  Loading checks every tensor name, shape and dtype against the config
and names the offending tensor in the error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ConfigError, ModelConfig
from ..model import BitNetModel
from .atomic import atomic_dir

FORMAT = "bitlm-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def _state_for_saving(model: BitNetModel) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same storage as the embedding
    return {k: v.detach().contiguous() for k, v in sd.items()}


def save_checkpoint(
    model: BitNetModel,
    path: str | Path,
    *,
    optimizer_state: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    step: int = 0,
    tokenizer=None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically; returns its path."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.to_dict(),
        "train": train_config,
        "step": int(step),
        "tokenizer": "tokenizer.json" if tokenizer is not None else None,
        **(extra or {}),
    }
    with atomic_dir(path) as tmp:
        save_file(_state_for_saving(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a bitlm checkpoint folder)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a bitlm checkpoint (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{cfg_file}: unsupported checkpoint version {meta.get('version')!r} (expected {VERSION})")
    return meta


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[BitNetModel, dict[str, Any]]:
    """Load ``(model, meta)`` from a checkpoint folder, validating every tensor."""
    path = Path(path)
    meta = read_meta(path)
    try:
        cfg = ModelConfig.from_dict(meta["model"], source=str(path / "config.json"))
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: bad model config: {e}") from None
    st = path / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{st}: missing")
    try:
        tensors = load_file(str(st), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{st}: corrupt or truncated safetensors ({str(e).splitlines()[0]})") from None
    model = BitNetModel(cfg)
    load_state_checked(model, tensors, str(st))
    return model, meta


def load_state_checked(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names the first missing / unexpected / mis-shaped tensor."""
    expected = _state_for_saving(model) if isinstance(model, BitNetModel) else model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected)")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(tensors[k].shape)}, config expects {tuple(v.shape)}")
        if tensors[k].dtype != v.dtype and not (tensors[k].is_floating_point() and v.is_floating_point()):
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {tensors[k].dtype}, expected {v.dtype}")
    model.load_state_dict(tensors, strict=False)  # tied lm_head is absent by design
