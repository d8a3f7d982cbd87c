"""bitlm's native checkpoint: a folder written atomically.

    <dir>/config.json          {"format": "bitlm-checkpoint", "version": 1, "model": ModelConfig,
                                "train": {...} | null, "step": int, "tokenizer": "tokenizer.json" | null,
                                "checksums": {"config.json": "sha256:...", "model.safetensors": "sha256:...", ...}}
    <dir>/model.safetensors    parameters (latent high-precision weights; tied lm_head omitted)
    <dir>/optimizer.pt         optimizer + scheduler state for resuming (training checkpoints only)
    <dir>/tokenizer.json       the tokenizer the model was trained with (when known)

Writes go to a sibling temp folder that is swapped into place (``bitlm.io.atomic.atomic_dir``),
so a crash never leaves a half-written checkpoint and an overwrite never leaves the path without
a complete one.  Loading checks every tensor name, shape and dtype against the config and names
the offending tensor in the error.

Corruption: ``checksums`` holds the SHA-256 of every file in the folder and, under
``config.json``, of the metadata itself (canonical JSON of config.json without that entry).
``load_checkpoint`` verifies the metadata and every recorded file it may read (all but
``optimizer.pt``, which ``bitlm train --resume`` verifies before loading it); a mismatch is a
``CheckpointError`` naming the file.  Hashing reads each file once more, on save and on load
(SHA-256: 1-2 GB/s on one core); ``load_checkpoint(..., verify=False)`` or the environment
variable ``BITLM_VERIFY=0`` skips the check on load.
Checkpoints written before checksums existed (no ``checksums`` key) load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ConfigError, ModelConfig
from ..model import BitNetModel
from . import read_json
from .atomic import atomic_dir

FORMAT = "bitlm-checkpoint"
VERSION = 1
VERIFY_ENV = "BITLM_VERIFY"  # "0" / "false" / "no" / "off": skip checksum verification on load
META = "config.json"
RESUME_ONLY = ("optimizer.pt",)  # verified by train's resume, not by every model load


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


def _state_for_saving(model: BitNetModel) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same storage as the embedding
    return {k: v.detach().contiguous() for k, v in sd.items()}


def file_sha256(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:  # hashlib.file_digest is 3.11+
        while n := f.readinto(buf):
            h.update(buf[:n])
    return "sha256:" + h.hexdigest()


def _meta_sha256(meta: dict[str, Any]) -> str:
    """Digest of the metadata as parsed (canonical JSON, without its own ``config.json`` entry):
    a flipped byte that still parses as JSON changes a value and so the digest."""
    sums = {k: v for k, v in (meta.get("checksums") or {}).items() if k != META}
    body = {**json.loads(json.dumps(meta)), "checksums": sums}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canon.encode()).hexdigest()


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    meta["checksums"][META] = _meta_sha256(meta)
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n")  # inside an atomic_dir temp folder


def record_checksums(folder: str | Path, names: list[str] | tuple[str, ...]) -> None:
    """Add the SHA-256 of ``folder/name`` for each name to the checkpoint's ``config.json``.

    For writers that put more files into a checkpoint folder after ``save_checkpoint`` (LoRA
    adapters), while it is still the temp folder of an ``atomic_dir``."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    sums = meta.setdefault("checksums", {})
    for name in names:
        sums[name] = file_sha256(folder / name)
    _write_meta(folder, meta)


def verify_enabled(verify: bool | None = None) -> bool:
    """``verify`` if given, else False only when ``BITLM_VERIFY`` is 0 / false / no / off."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verify_checksums(folder: str | Path, meta: dict[str, Any], names: list[str] | tuple[str, ...] | None = None) -> None:
    """Check the recorded SHA-256 of ``names`` (default: every recorded file but the
    resume-only ones); raises ``CheckpointError`` naming the first file that differs.
    A checkpoint without checksums (written before they existed) passes."""
    folder = Path(folder)
    sums = meta.get("checksums")
    if not sums:
        return
    if not isinstance(sums, dict):
        raise CheckpointError(f"{folder / META}: 'checksums' is not an object")
    if names is None:
        names = [n for n in sums if n != META and n not in RESUME_ONLY]
    for name in names:
        want = sums.get(name)
        if want is None:
            continue
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed in {META})")
        got = file_sha256(f)
        if got != want:
            raise CheckpointError(f"{f}: corrupt (SHA-256 differs from the one recorded in {META} when it was "
                                  f"saved); restore it from a copy ({VERIFY_ENV}=0 loads it unverified)")


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
        meta["checksums"] = {f.name: file_sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        _write_meta(tmp, meta)
    return path


def read_meta(path: str | Path, *, verify: bool | None = None) -> dict[str, Any]:
    """The checkpoint's ``config.json``, format-checked (and checksum-checked unless ``verify``
    is False / ``BITLM_VERIFY=0``)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing (not a bitlm checkpoint folder)")
    meta = read_json(cfg_file, CheckpointError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: not a bitlm checkpoint (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{cfg_file}: unsupported checkpoint version {meta.get('version')!r} (expected {VERSION})")
    sums = meta.get("checksums")
    if verify_enabled(verify) and isinstance(sums, dict) and META in sums and sums[META] != _meta_sha256(meta):
        raise CheckpointError(f"{cfg_file}: corrupt (its values differ from the SHA-256 recorded when it was saved); "
                              f"restore it from a copy ({VERIFY_ENV}=0 loads it unverified)")
    return meta


def load_checkpoint(
    path: str | Path, map_location: str = "cpu", *, verify: bool | None = None
) -> tuple[BitNetModel, dict[str, Any]]:
    """Load ``(model, meta)`` from a checkpoint folder, validating every tensor.

    ``verify`` (default: on unless ``BITLM_VERIFY=0``) checks the recorded SHA-256 of the
    metadata and of every file but ``optimizer.pt`` first."""
    path = Path(path)
    meta = read_meta(path, verify=verify)
    if verify_enabled(verify):
        verify_checksums(path, meta)
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
