"""Tensor parallelism the BitNet way: DTensor ``parallelize_module`` plans for the three
architectures, and the two ways a sharded BitLinear gets its quantisation parameters.

The plan (torchtitan's Llama plan without sequence parallelism, ``torch.distributed.tensor.parallel``):

* q/k/v/gate/up: ``ColwiseParallel`` (weight rows split, input replicated, output split by heads /
  FFN features; attention runs on the local heads, GQA included);
* o/down: ``RowwiseParallel`` (weight columns split, input split, output all-reduced);
* the SubLN norms right before o/down (attn_sub_norm / ffn_sub_norm): their weight is split like
  the features they normalise (``ShardedNorm``);
* embedding and output head: vocabulary-parallel (``RowwiseParallel`` / ``ColwiseParallel`` on the
  vocab dim, logits all-gathered); tied embeddings stay tied;
* the other norms: replicated DTensors (every parameter is a DTensor on the tp mesh, so AdamW's
  foreach kernels, gradient clipping and FSDP2 see one kind of tensor).

Quantisation under tensor parallelism (2310.11453 Eq. 13-15) is decided per statistic by the
config, never by accident: a statistic whose groups lie whole inside each rank's shard is computed
locally (no communication); any other is reduced explicitly over the tp group — Σ|w| (and Σw for
b1) per weight group all-reduced (SUM), the absmax γ (and η) of a row-parallel input all-reduced
(MAX), the sub-norms' Σx (LayerNorm: then Σ(x-μ)²) / Σx² all-reduced (SUM, differentiable).  So:

* ``group`` mode (``group_config``): weight_groups = act_groups = norm_groups = G (a multiple of
  the tp degree), weight_group_dim="parallel", group_scope="parallel" — no communication for any
  scale, and one process runs the same config exactly (the emulation);
* ``global`` mode: no groups — parity with the unsharded model, paying one all-reduce per weight
  scale, per row-parallel γ and per sub-norm statistic (forward; the norms' also in backward).

Naive BitLinear code on DTensors would get the global numbers through implicit redistributions;
here BitLinear works on the local shards (``BitLinear.tp_forward``, set by ``apply_tp``) and every
scale collective goes through ``_all_reduce``, which counts calls and bytes (``comm_counts``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant as Q
from .config import ModelConfig

__all__ = ["TP_QUANTS", "group_config", "tp_quant_mode", "check_tp", "apply_tp", "ShardedNorm", "comm_counts",
           "reset_comm_counts", "CommBytes"]

TP_QUANTS = ("group", "global")

_COUNTS: dict[str, int] = {}


def reset_comm_counts() -> None:
    """Zero the scale-collective counters of this process."""
    _COUNTS.clear()


def comm_counts() -> dict[str, int]:
    """Scale collectives issued by this process since the last reset: ``calls`` and ``bytes`` in
    all, and calls per site (``weight``, ``act``, ``norm``, ``norm_backward``)."""
    return {"calls": 0, "bytes": 0, **_COUNTS}


def _count(site: str, t: torch.Tensor) -> None:
    _COUNTS[site] = _COUNTS.get(site, 0) + 1
    _COUNTS["calls"] = _COUNTS.get("calls", 0) + 1
    _COUNTS["bytes"] = _COUNTS.get("bytes", 0) + t.numel() * t.element_size()


def _all_reduce(t: torch.Tensor, group, op: str, site: str) -> torch.Tensor:
    import torch.distributed as dist

    _count(site, t)
    t = t.contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


class _AllReduceSum(torch.autograd.Function):
    """Σ over the tp group, differentiable: every rank's downstream use is a partial
    contribution, so the gradient is all-reduced as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _all_reduce(x.clone(), group, "sum", "norm")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.clone(), ctx.group, "sum", "norm_backward"), None


# ---------------------------------------------------------------------------------------------
# Configuration: the group mode, the divisibility checks
# ---------------------------------------------------------------------------------------------


def group_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """``cfg`` in the paper's group mode for ``tp`` ranks: G = tp groups on the partition dims
    (kept when ``cfg`` already has a multiple of tp there)."""
    g = cfg.weight_groups if cfg.weight_groups > 1 and cfg.weight_groups % tp == 0 else tp
    return cfg.replace(weight_groups=g, weight_group_dim="parallel", act_groups=g, norm_groups=g,
                       group_scope="parallel")


def tp_quant_mode(cfg: ModelConfig, tp: int) -> str:
    """``global`` without groups; ``group`` when every scale of ``cfg`` lies whole inside a tp
    shard (no communication); ``mixed`` for groups that still need reductions."""
    if all(g == 1 for g in (cfg.weight_groups, cfg.act_groups, cfg.norm_groups)):
        return "global"
    fp = cfg.quant == "fp"
    local = ((fp or (cfg.weight_groups % tp == 0 and cfg.weight_group_dim == "parallel"))
             and (fp or cfg.act_groups % tp == 0) and (cfg.norm_groups % tp == 0 or not cfg.sub_norm))
    return "group" if local else "mixed"


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """One-line ValueError naming the option when ``tp`` cannot split ``cfg``."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.kv_heads), ("ffn width (d_ff)", cfg.ffn_dim),
                    ("vocab_size", cfg.vocab_size)):
        if n % tp:
            raise ValueError(f"--tp {tp} does not divide the model's {name}={n}")
    if cfg.weight_groups > 1 and cfg.weight_group_dim == "parallel" and cfg.weight_groups % tp and tp % cfg.weight_groups:
        raise ValueError(f"--tp {tp}: weight_groups={cfg.weight_groups} is neither a multiple nor a divisor of it")


# ---------------------------------------------------------------------------------------------
# BitLinear on tp shards
# ---------------------------------------------------------------------------------------------


def _group_ids(n_local: int, n_global: int, groups: int, offset: int, device) -> torch.Tensor:
    """The global group index of each of the local positions offset .. offset + n_local - 1."""
    return (offset + torch.arange(n_local, device=device)) // (n_global // groups)


def _fake_quant_weight_tp(m, wl: torch.Tensor, shard_dim: int, lam, group, rank: int, tp: int) -> torch.Tensor:
    """Q.fake_quant_weight of the whole weight, restricted to this rank's shard ``wl``."""
    if m.weight_quant == "fp":
        return wl
    G, dim = m.weight_groups, m.weight_group_dim
    gdim = 0 if dim == "out" else 1
    if gdim == shard_dim and G % tp == 0:  # whole groups on this rank: the paper's partition, no comm
        return Q.fake_quant_weight(wl, m.weight_quant, G // tp, lam, dim)
    wf = wl.detach().float()
    n_local = wf.shape[gdim]
    n_global = n_local * tp if gdim == shard_dim else n_local
    gid = _group_ids(n_local, n_global, G, rank * n_local if gdim == shard_dim else 0, wf.device)
    other = 1 - gdim
    sums = [wf.abs().sum(dim=other)] + ([wf.sum(dim=other)] if m.weight_quant == "b1" else [])
    stats = torch.zeros(len(sums), G, dtype=torch.float32, device=wf.device)
    for i, s in enumerate(sums):
        stats[i].index_add_(0, gid, s)
    stats = _all_reduce(stats, group, "sum", "weight") / (wf.numel() * tp / G)  # the whole weight's groups
    shape = (-1, 1) if gdim == 0 else (1, -1)
    s = stats[0].clamp(min=Q.SCALE_EPS)[gid].reshape(shape)
    if m.weight_quant == "b1.58":
        t = Q.round_half_even(wf / s).clamp(-1, 1)
    else:  # b1: T = Sign(W - α), β = mean|W|
        t = torch.where(wf - stats[1][gid].reshape(shape) > 0, 1.0, -1.0)
    return Q.ste(wl, (t * s).to(wl.dtype), lam)


def _fake_quant_act_sharded(m, xl: torch.Tensor, gran: str, lam, group, rank: int, tp: int) -> torch.Tensor:
    """Q.fake_quant_activation(_nonneg) of the whole features, restricted to this rank's slice
    of them (the row-parallel input)."""
    A = m.act_groups
    if A % tp == 0:  # whole groups on this rank: no comm
        if m.act_nonneg:
            return Q.fake_quant_activation_nonneg(xl, m.act_bits, gran, A // tp, lam)
        return Q.fake_quant_activation(xl, m.act_bits, gran, A // tp, lam)
    qmax = 2 ** (m.act_bits - 1) - 1
    xf = xl.detach().float()
    f = xf.shape[-1]
    gid = _group_ids(f, f * tp, A, rank * f, xf.device)
    lead = xf.shape[:-1] if gran == "token" else (1,) * (xf.dim() - 1)
    flat = xf.reshape(-1, f) if gran == "token" else xf.reshape(1, -1, f)

    def gmax(v: torch.Tensor) -> torch.Tensor:  # (..., f) → (..., A): max per group of features
        if gran == "tensor":
            v = v.amax(dim=1)  # over all tokens: (1, f)
        out = torch.full((v.shape[0], A), -torch.inf, dtype=v.dtype, device=v.device)
        return out.scatter_reduce_(1, gid.expand(v.shape[0], f), v, "amax")

    if m.act_nonneg:
        both = torch.cat([gmax(flat), gmax(-flat)], dim=-1)
        both = _all_reduce(both, group, "max", "act")
        hi, eta = both[:, :A], -both[:, A:]
        eta_e = eta[:, gid].reshape(*lead, f)
        a = (qmax / (hi - eta).clamp(min=Q.SCALE_EPS))[:, gid].reshape(*lead, f)
        q = Q.round_half_even((xf - eta_e) * a).clamp(0, qmax)
        return Q.ste(xl, (q / a + eta_e).to(xl.dtype), lam)
    gamma = _all_reduce(gmax(flat.abs()), group, "max", "act")
    a = (qmax / gamma.clamp(min=Q.SCALE_EPS))[:, gid].reshape(*lead, f)
    q = Q.round_half_even(xf * a).clamp(-qmax - 1, qmax)
    return Q.ste(xl, (q / a).to(xl.dtype), lam)


def _tp_linear_forward(m, x) -> Any:
    """BitLinear's forward on tp shards (installed as ``m.tp_forward`` by ``apply_tp``): the input
    and weight as local tensors, the scales local or explicitly reduced, the output a DTensor
    (Shard(-1) for column-parallel, Partial for row-parallel: the plan's output hook reduces it)."""
    from torch.distributed.tensor import DTensor, Partial, Shard

    w = m.weight
    mesh = w.device_mesh
    row = isinstance(w.placements[0], Shard) and w.placements[0].dim == 1
    group, tp, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    lam = m._lambda()
    if row:
        if m.norm is not None:
            raise ValueError("tensor parallelism: a row-parallel BitLinear with a built-in norm is not supported")
        xl = x.to_local()  # Shard(-1): the gradient is this slice's
    else:
        xl = x.to_local(grad_placements=[Partial()])  # replicated input: each rank's gradient is partial
        xl = m.normalize(xl)
    if m.act_bits is not None:
        gran = m.act_granularity if m.training else m.act_granularity_eval
        if row:
            xl = _fake_quant_act_sharded(m, xl, gran, lam, group, rank, tp)
        elif m.act_nonneg:
            xl = Q.fake_quant_activation_nonneg(xl, m.act_bits, gran, m.act_groups, lam)
        else:
            xl = Q.fake_quant_activation(xl, m.act_bits, gran, m.act_groups, lam)
    wq = _fake_quant_weight_tp(m, w.to_local(), 1 if row else 0, lam, group, rank, tp)
    if row:
        if m.bias is not None:
            raise ValueError("tensor parallelism: a row-parallel BitLinear with a bias is not supported")
        return DTensor.from_local(F.linear(xl, wq), mesh, [Partial()], run_check=False)
    y = F.linear(xl, wq, m.bias.to_local() if m.bias is not None else None)
    return DTensor.from_local(y, mesh, [Shard(-1)], run_check=False)


# ---------------------------------------------------------------------------------------------
# The sub-norms in front of o/down: features split across ranks
# ---------------------------------------------------------------------------------------------


class ShardedNorm(nn.Module):
    """The RMSNorm / LayerNorm (grouped or not) of ``bitlm.model`` on a feature slice: weight (and
    bias) split like the features; statistics per local group (group mode) or all-reduced over the
    tp group (global).  Same parameter names as the module it replaces."""

    def __init__(self, norm: nn.Module, mesh) -> None:
        super().__init__()
        from torch.distributed.tensor import Shard, distribute_tensor

        self.kind = "rms" if not isinstance(norm, nn.LayerNorm) else "ln"
        self.groups = getattr(norm, "groups", 1)
        self.eps = norm.eps
        self.mesh = mesh
        self.weight = nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Shard(0)]))
        if self.kind == "ln":
            self.bias = nn.Parameter(distribute_tensor(norm.bias.detach(), mesh, [Shard(0)]))

    def extra_repr(self) -> str:
        return f"{self.kind}, groups={self.groups}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tp, rank = self.mesh.size(), self.mesh.get_local_rank()
        w = self.weight.to_local()
        N = self.groups
        if N % tp == 0:  # whole groups on this rank (tp > 1 here, so N > 1: the group formulas)
            if self.kind == "rms":
                return w * Q.group_rms_norm(x.float(), N // tp, self.eps).to(x.dtype)
            return Q.group_layer_norm(x, N // tp, self.eps) * w + self.bias.to_local()
        group = self.mesh.get_group()
        xf = x.float()
        f = xf.shape[-1]
        gid = _group_ids(f, f * tp, N, rank * f, xf.device)
        count = f * tp / N

        def gsum(v: torch.Tensor) -> torch.Tensor:  # (..., f) → (..., N), summed over the tp group
            s = torch.zeros(*v.shape[:-1], N, dtype=v.dtype, device=v.device).index_add(-1, gid, v)
            return _AllReduceSum.apply(s, group)

        if self.kind == "rms":
            ms = gsum(xf.pow(2)) / count
            return w * (xf * torch.rsqrt(ms + self.eps)[..., gid]).to(x.dtype)
        mu = (gsum(xf) / count)[..., gid]
        d = xf - mu
        var = gsum(d.pow(2)) / count
        return (d * torch.rsqrt(var + self.eps)[..., gid]).to(x.dtype) * w + self.bias.to_local()


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def _replicate(module: nn.Module, mesh) -> None:
    """Parameters as replicated DTensors; plain tensors in and out."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def inp(mod, inputs, device_mesh):
        return tuple(DTensor.from_local(t, device_mesh, [Replicate()], run_check=False)
                     if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

    def out(mod, outputs, device_mesh):
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs

    distribute_module(module, mesh, None, inp, out)


def apply_tp(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model`` (a ``BitNetModel`` on the mesh's device) over the 1-D tp ``mesh`` in place."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from .layers import BitLinear

    cfg: ModelConfig = model.config
    tp = mesh.size()
    check_tp(cfg, tp)
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        plan: dict[str, Any] = {f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
        plan["self_attn.o_proj"] = RowwiseParallel()
        plan["mlp.up_proj"] = ColwiseParallel()
        if cfg.gated_ffn:
            plan["mlp.gate_proj"] = ColwiseParallel()
        plan["mlp.down_proj"] = RowwiseParallel()
        parallelize_module(block, mesh, plan)
        for parent, name in ((attn, "attn_sub_norm"), (mlp, "ffn_sub_norm")):
            norm = getattr(parent, name)
            if not isinstance(norm, nn.Identity):
                setattr(parent, name, ShardedNorm(norm, mesh))
        _replicate(block.input_layernorm, mesh)
        _replicate(block.post_attention_layernorm, mesh)
        for mod in block.modules():
            if isinstance(mod, BitLinear):
                mod.tp_forward = _tp_linear_forward
    _replicate(model.model.norm, mesh)
    tied = cfg.tie_embeddings
    parallelize_module(model, mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # both are (vocab, d) split on the vocab dim: one parameter again
        model.model.embed_tokens.weight = model.lm_head.weight
    return model


class CommBytes:
    """Context manager counting the bytes DTensor's own collectives move (the TP activations'
    all-reduces / all-gathers, forward and backward), per process: ``.bytes``, ``.calls``."""

    _OPS = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._mode = None

    def __enter__(self) -> CommBytes:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if func.namespace == "_c10d_functional" and name.split(".")[0] in CommBytes._OPS:
                    t = args[0]
                    outer.calls += 1
                    outer.bytes += t.numel() * t.element_size()
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
