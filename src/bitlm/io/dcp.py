"""Distributed checkpoints: a folder that every rank writes its own shard into, through
``torch.distributed.checkpoint`` (DCP).

    <dir>/config.json       {"format": "bitlm-dcp", "version": 1, "model": ModelConfig,
                             "train": {...} | null, "step": int, "world_size": int, "parallel": str,
                             "dp": int, "tp": int, "tp_quant": "group" | "global" | "mixed",
                             "tokenizer": "tokenizer.json" | null, ...}
    <dir>/.metadata         DCP's index of the state: {"model": model state dict, "optim": optimizer
    <dir>/__<r>_0.distcp    state dict (parameter names as keys)}, one data file per rank

Written atomically: rank 0 makes a temp sibling folder (``bitlm.io.atomic.atomic_dir``) and sends
its path to every rank; all ranks save their shards into it; after a barrier rank 0 writes
``config.json`` and tokenizer.json and swaps the folder in.  A run killed mid-save leaves the old
checkpoint in place.

Loading reshards: DCP reads each tensor into the layout the model has now, so a checkpoint of
two FSDP ranks resumes in one process and a one-process checkpoint resumes on two ranks.
Tensor-parallel shards (DTensors over the tp mesh) are saved as whole tensors by DCP as well;
``tp`` / ``tp_quant`` in config.json record how the run split and scaled them, and the model
config itself carries the groups of ``group`` mode, so the one-process model computes exactly
what the sharded one did.  ``load_dcp_model`` reads only the model into a plain ``BitNetModel`` (what ``bitlm.load``,
``bitlm pack`` and ``bitlm export`` get, and what ``bitlm checkpoint consolidate`` writes as a
native checkpoint).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..model import BitNetModel
from . import read_json
from .atomic import atomic_dir

FORMAT = "bitlm-dcp"
VERSION = 1
META = "config.json"

__all__ = ["FORMAT", "is_dcp", "read_dcp_meta", "save_dcp", "load_dcp", "load_dcp_model"]


class DCPError(ValueError):
    """A distributed checkpoint that is missing, incomplete or does not fit the model."""


def is_dcp(path: str | Path) -> bool:
    f = Path(path) / META
    if not f.is_file():
        return False
    try:
        meta = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_dcp_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    f = path / META
    if not f.is_file():
        raise DCPError(f"{f}: missing (not a bitlm checkpoint folder)")
    meta = read_json(f, DCPError)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DCPError(f"{f}: not a distributed bitlm checkpoint")
    if meta.get("version") != VERSION:
        raise DCPError(f"{f}: unsupported distributed checkpoint version {meta.get('version')!r} (expected {VERSION})")
    if not (path / ".metadata").is_file():
        raise DCPError(f"{path / '.metadata'}: missing (incomplete distributed checkpoint)")
    return meta


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path,
             meta: dict[str, Any], tokenizer=None) -> Path:
    """Every rank calls this (a collective under torchrun; alone it works in one process)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    dist = _dist()
    rank = dist.get_rank() if dist else 0
    state = _states(model, optimizer)
    if rank == 0:
        with atomic_dir(path) as tmp:
            if dist:
                dist.broadcast_object_list([str(tmp)], src=0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
                dcp.save(state, checkpoint_id=str(tmp))
            if dist:
                dist.barrier()
            full = {"format": FORMAT, "version": VERSION, **meta,
                    "tokenizer": "tokenizer.json" if tokenizer is not None else None}
            if tokenizer is not None:
                tokenizer.save(tmp / "tokenizer.json")
            (tmp / META).write_text(json.dumps(full, indent=2) + "\n")  # last: inside the temp folder
        if dist:
            dist.barrier()  # the others return once the checkpoint is in place
    else:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        dcp.save(state, checkpoint_id=box[0])
        dist.barrier()
        dist.barrier()
    return path


def load_dcp(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> dict[str, Any]:
    """Load model (and optimizer) state from a distributed checkpoint into the model's current
    layout (resharding as needed); returns the checkpoint's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    meta = read_dcp_meta(path)
    state = _states(model, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - DCP wraps reader errors in CheckpointException
        raise DCPError(f"{path}: does not fit the model or is damaged ({type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return meta


def load_dcp_model(path: str | Path) -> tuple[BitNetModel, dict[str, Any]]:
    """A plain one-process ``BitNetModel`` from a distributed checkpoint (any world size)."""
    meta = read_dcp_meta(path)
    model = BitNetModel(ModelConfig.from_dict(meta["model"]))
    load_dcp(model, None, path)
    return model.eval(), meta
