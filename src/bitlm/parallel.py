"""Where training runs: the device, the precision, ``torch.compile``, and data parallelism on
torchrun (DDP and FSDP2) — all through torch itself, no launcher or communication layer of our own.

* **Device** (``resolve_device``): ``auto`` is CUDA when available, else the CPU (MPS only when
  asked for).  Asking for a device that is not there is a one-line error naming ``--device``.
* **Precision** (``resolve_precision``, ``autocast``): ``fp32`` or ``bf16`` autocast on the
  device's own type; the default is bf16 on CUDA and fp32 elsewhere.
* **Compile** (``compile_blocks``): ``torch.compile`` per transformer block, in place
  (``Module.compile``), so state-dict keys stay those of the eager model.
* **Batches** (``to_device``): on CUDA pinned and copied non-blocking; elsewhere moved plainly.
* **Data parallelism** (``init_distributed``, ``wrap_model``): the rank, world size and local rank
  come from torchrun's environment; the process group is gloo on the CPU and nccl on CUDA, with
  a timeout so that a dead peer ends the others with an error rather than a hang; the 1-D device
  mesh ``("dp",)`` carries DDP or FSDP2.  FSDP2 is ``fully_shard`` on each block, then on the root
  (torchtitan's order), with a ``MixedPrecisionPolicy`` that reduces gradients in fp32.
* **Tensor parallelism** (``tp`` > 1): the mesh is 2-D ``("dp", "tp")``; ``wrap_model`` applies
  ``bitlm.tensor_parallel.apply_tp`` on the ``tp`` dimension first, then FSDP2 on ``dp``
  (torchtitan's order); ``dp_rank`` / ``dp_world`` say which data a rank reads (the ranks of one tp
  group read the same batch).  DDP does not compose with it (use FSDP2).
* **Global absmean** (``global_absmean``): a weight sharded as a DTensor (FSDP2 outside its
  forward, e.g. a scale computed once per optimizer step) gets the whole tensor's mean|W| by
  all-reducing Σ|w| and the element count — exact for uneven shards, unlike averaging per-shard
  means.  Inside an FSDP2 forward the parameters are already unsharded, so ``BitLinear`` sees
  the whole tensor there.
* **Host allocator** (``keep_freed_host_memory``): a training step frees and re-allocates the
  same large activation buffers every step; glibc returns each to the kernel (``munmap`` / heap
  trim) and the next step page-faults it back in — 40-60 k faults and 50-150 ms of system time
  per small-preset step on the project's 2-core VM.  Training processes ask glibc to
  keep freed memory for reuse instead (``mallopt``), unless ``BITLM_MALLOC=system`` or the
  user's own malloc settings (``MALLOC_*``, ``GLIBC_TUNABLES``) say otherwise.
* **Kernel threads** (``kernel_threads_like_torch``): bitlm's native pool sizes itself to the
  CPUs, torch to ``OMP_NUM_THREADS`` — which torchrun sets to 1 per rank — so two CPU ranks on
  two cores ran four kernel threads.  Training processes give the pool torch's count
  unless ``BITLM_NUM_THREADS`` says otherwise.

The model file stays free of distributed code: this module wraps a built model.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DEVICES", "PRECISIONS", "PARALLEL", "BACKENDS", "resolve_device", "resolve_precision", "autocast",
           "to_device", "compile_blocks", "Dist", "init_distributed", "wrap_model", "unwrap", "global_absmean",
           "all_reduce_mean", "all_reduce_sum", "agree", "no_grad_sync", "torchrun_env", "apply_tensor_parallel",
           "keep_freed_host_memory", "kernel_threads_like_torch", "setup_training_process"]

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16")
PARALLEL = ("none", "ddp", "fsdp")
BACKENDS = ("auto", "gloo", "nccl")


# glibc mallopt parameters (malloc.h) and the values keep_freed_host_memory sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_KEEP = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 64 << 20))


def keep_freed_host_memory() -> bool:
    """Have glibc keep freed host memory for reuse: blocks up to 1 GiB come from the heap rather
    than their own mmap, the heap is never trimmed, and it grows 64 MiB at a time, so a training
    step re-uses the pages the previous step freed instead of faulting fresh zeroed ones in.  The
    resident set stays at its high-water mark (the step's peak, which it reaches every step
    anyway).  Returns whether the setting was applied: False off glibc, with ``BITLM_MALLOC=system``,
    or when the user tuned malloc (a ``MALLOC_*`` variable or ``GLIBC_TUNABLES``: theirs wins)."""
    if (os.environ.get("BITLM_MALLOC", "") == "system" or any(k.startswith("MALLOC_") for k in os.environ)
            or "malloc" in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _MALLOC_KEEP)


def kernel_threads_like_torch() -> int:
    """Size bitlm's native kernel pool to torch's intra-op thread count (the QAT step's integer
    product and element passes then use the threads the rest of the step uses), unless
    ``BITLM_NUM_THREADS`` is set.  Returns the pool's thread count."""
    from . import kernels

    if "BITLM_NUM_THREADS" not in os.environ:
        kernels.set_num_threads(max(1, torch.get_num_threads()))
    return kernels.num_threads()


def setup_training_process() -> None:
    """What every training process (``train``, ``time_train_step``, ``bench_train``) sets up once
    before its first step: :func:`keep_freed_host_memory` and :func:`kernel_threads_like_torch`."""
    keep_freed_host_memory()
    kernel_threads_like_torch()


def resolve_device(name: str | None = "auto", local_rank: int = 0) -> torch.device:
    """``auto|cpu|cuda|mps`` → a ``torch.device`` (``cuda:local_rank`` for CUDA)."""
    name = name or "auto"
    if name not in DEVICES:
        raise ValueError(f"--device {name!r}: choose one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use --device cpu or auto")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"--device cuda: local rank {local_rank} but only {n} CUDA device(s) visible")
        return torch.device("cuda", local_rank)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    return torch.device("cpu")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``fp32`` / ``bf16``; None → bf16 on CUDA, fp32 elsewhere."""
    if precision is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device | str, precision: str = "fp32"):
    """bf16 autocast on the device's own type (a no-op context for fp32)."""
    dtype = torch.device(device).type
    return torch.autocast(dtype, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on ``device``: pinned and copied non-blocking on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` each transformer block in place (state-dict keys unchanged)."""
    for block in model.model.layers:
        block.compile()
    return model


# ---------------------------------------------------------------------------------------------
# Data parallelism
# ---------------------------------------------------------------------------------------------


def torchrun_env() -> dict[str, int] | None:
    """(rank, world, local_rank) from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
    except ValueError:
        raise ValueError("RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers "
                         "(set by torchrun)") from None


@dataclass
class Dist:
    """One process's place in the run: rank, world size, device, mesh (None: one process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "none"
    backend: str | None = None
    mesh: Any = None  # the data-parallel mesh ("dp"): the whole world without tensor parallelism
    tp: int = 1
    tp_mesh: Any = None

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas: the world size over the tp degree."""
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        """This rank's data stream: the index of its tp group."""
        return self.mesh.get_local_rank() if self.tp > 1 else self.rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                # every rank reaches here before any tears its connections down: gloo aborts a
                # rank ("terminate called without an active exception") whose peer closed first
                dist.barrier()
                dist.destroy_process_group()
            self.mesh = self.tp_mesh = None


def init_distributed(device: str | None = "auto", parallel: str = "none", backend: str = "auto",
                     timeout_s: float = 600.0, tp: int = 1) -> Dist:
    """The process group and device mesh for ``parallel`` (``ddp``/``fsdp``) and tensor
    parallelism of degree ``tp`` under torchrun, or a one-process ``Dist`` for ``none``.  Raises
    ValueError (one line naming the option) for a backend the device cannot use, ``--parallel`` /
    ``--tp`` outside torchrun, or a ``--tp`` that does not divide the world size."""
    if parallel not in PARALLEL:
        raise ValueError(f"--parallel {parallel!r}: choose one of {', '.join(PARALLEL)}")
    if backend not in BACKENDS:
        raise ValueError(f"--dist-backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    env = torchrun_env()
    if tp > 1 and env is None:
        raise ValueError(f"--tp {tp} needs torchrun (torchrun --nproc-per-node N -m bitlm train ... "
                         "or bitlm train --nproc N)")
    if env is not None and env["world"] % tp:
        raise ValueError(f"--tp {tp} does not divide the world size {env['world']}")
    if tp > 1 and parallel == "ddp":
        raise ValueError("--parallel ddp with --tp: DDP does not compose with tensor parallelism; use --parallel fsdp")
    if parallel == "none":
        if env is not None and env["world"] > tp:
            raise ValueError(f"--parallel none under torchrun with WORLD_SIZE={env['world']}"
                             + (f" and --tp {tp}" if tp > 1 else "") + ": every rank would "
                             "train the same model alone; pass --parallel ddp or fsdp")
        if tp == 1:
            return Dist(device=resolve_device(device))
    if env is None:
        raise ValueError(f"--parallel {parallel} needs torchrun (torchrun --nproc-per-node N -m bitlm train ... "
                         "or bitlm train --nproc N)")
    dev = resolve_device(device, env["local_rank"])
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        import torch.distributed as dist

        if dev.type != "cuda" or not dist.is_nccl_available():
            raise ValueError(f"--dist-backend nccl: needs CUDA devices and a torch built with NCCL (device is "
                             f"{dev.type}); use --dist-backend gloo on the CPU")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    # FSDP2 on gloo must be given the CPU mesh (pytorch/pytorch#132471)
    tp_mesh = None
    if tp > 1:
        mesh2 = init_device_mesh(dev.type, (env["world"] // tp, tp), mesh_dim_names=("dp", "tp"))
        mesh, tp_mesh = mesh2["dp"], mesh2["tp"]
    else:
        mesh = init_device_mesh(dev.type, (env["world"],), mesh_dim_names=("dp",))
    return Dist(rank=env["rank"], world=env["world"], local_rank=env["local_rank"], device=dev,
                parallel=parallel, backend=backend, mesh=mesh, tp=tp, tp_mesh=tp_mesh)


def apply_tensor_parallel(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """Shard ``model`` over ``d``'s tp mesh (``bitlm.tensor_parallel.apply_tp``); a no-op at tp 1.
    Call before ``compile_blocks`` and ``wrap_model`` (torchtitan's order)."""
    if d.tp > 1:
        from .tensor_parallel import apply_tp

        apply_tp(model, d.tp_mesh)
    return model


def wrap_model(model: torch.nn.Module, d: Dist, precision: str = "fp32") -> torch.nn.Module:
    """DDP or FSDP2 (per block, then the root) around ``model`` (already on ``d.device``; with
    tensor parallelism already sharded by ``apply_tensor_parallel``: FSDP2 then shards on dp)."""
    if d.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradients as views of the all-reduce buckets: no copy into / out of the buckets (the same
        # values; measured on 2 x 1 CPU thread, gloo: 1.68-1.74x -> 1.80x one process's tokens/s).
        # No buffer broadcast before every forward: the training buffers (BitLinear's quant_lambda; a
        # frozen layer's weight_scale is constant) are set identically on every rank (the λ schedule
        # is a function of the step; checkpoints load on all ranks), and the broadcast is a
        # collective — a wait for the slowest rank — per forward (DDP.forward's own time, 2 x 1 thread, loaded machine: 38-53 -> 19-24 ms per step).
        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                   gradient_as_bucket_view=True, broadcast_buffers=False)
    if d.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=d.mesh, mp_policy=mp)
        fully_shard(model, mesh=d.mesh, mp_policy=mp)
        for m in model.modules():  # FSDP2's all-gather rewrites the unsharded weight's storage without
            if hasattr(m, "weight_cache"):  # bumping its version: BitLinear must not cache its codes
                m.weight_cache = False
        return model
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The BitNetModel inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, d: Dist, sync: bool):
    """Skip the gradient all-reduce of a micro-batch that is not the last of its step."""
    if sync or d.parallel not in ("ddp", "fsdp"):
        yield
    elif d.parallel == "ddp":
        with model.no_sync():
            yield
    else:  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def all_reduce_mean(x: float, d: Dist) -> float:
    """The mean of a float over the ranks (the float itself in one process)."""
    if not d.distributed:
        return x
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64, device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world


def agree(values: list[float], d: Dist) -> list[float]:
    """The element-wise maximum over the ranks: decisions every rank must take together (stop on
    a signal one rank got, stop at --max-time, save by wall time)."""
    if not d.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def global_absmean(w: torch.Tensor) -> torch.Tensor:
    """mean|W| of the whole tensor, also when ``w`` is a sharded DTensor: Σ|w| and the element
    count are all-reduced (exact for uneven shards).  Float32, shape ()."""
    from torch.distributed.tensor import DTensor

    if not isinstance(w, DTensor):
        return w.detach().float().abs().mean()
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    local = w.to_local().detach().float()
    if not any(isinstance(p, Shard) for p in w.placements):  # replicated: every rank holds it all
        return local.abs().mean()
    stats = torch.stack([local.abs().sum(), torch.tensor(float(local.numel()), device=local.device)])
    dist.all_reduce(stats, group=w.device_mesh.get_group())
    return stats[0] / stats[1]
