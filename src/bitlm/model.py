"""One readable decoder-only transformer for the three BitNet architectures (see ``bitlm.config``).

Layer layout (per block), with Norm = LayerNorm for ``bitnet`` and RMSNorm otherwise:

    h = Norm_in(x);  q, k, v = Wq h, Wk h, Wv h;  RoPE(q, k);  a = softmax(q kᵀ/√d) v   (causal, GQA)
    x = x + Wo · Norm_attn_sub(a)                                   # SubLN before o_proj
    h = Norm_post(x)
    m = act(Wup h)                        (bitnet: GELU, width 4d)
      | silu(Wgate h) ⊙ Wup h             (bitnet-b1.58: SwiGLU)
      | relu(Wgate h)² ⊙ Wup h            (bitnet-2b4t: ReLU²-GLU)
    x = x + Wdown · Norm_ffn_sub(m)                                 # SubLN before down_proj

Two config flags exist for models converted from LLaMA-family checkpoints (``bitlm.convert``):
``sub_norm=False`` makes both SubLN norms identities (the LLaMA graph), ``qkv_bias=True`` gives
q/k/v a bias (Qwen2).

Group options (2310.11453 Eq. 13-15; ``bitlm.config`` documents them): ``weight_groups`` along
``weight_group_dim`` ("parallel": output rows for q/k/v/gate/up, input columns for o/down),
``act_groups`` for every BitLinear input, ``norm_groups`` for the four block norms (not the final
one) — or, with ``group_scope="parallel"``, only for o/down's inputs and the two sub-norms in
front of them (the features tensor parallelism splits); ``act_nonneg`` quantises the input of the projection feeding the FFN non-linearity (up for
GELU, gate for the gated FFNs) with the η variant.  ``inference_blockers`` names the ones that
packing and export cannot carry.

Every W is a ``BitLinear`` when quant ∈ {b1, b1.58} and a plain ``nn.Linear`` for ``fp``; the
norms, embeddings and output head are the same in both, so ``fp`` is the exact baseline.
Parameter names follow transformers' BitNetForCausalLM (``model.layers.N.self_attn.q_proj`` ...)
so that Hugging Face checkpoints map one-to-one.

Incremental decoding uses ``KVCache``; ``forward(ids, cache=...)`` gives the same logits as a full
forward over the whole sequence (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import quant as Q
from .config import ACT_VARIANTS, ModelConfig
from .layers import BitLinear

__all__ = ["BitNetModel", "KVCache", "RMSNorm", "GroupLayerNorm", "make_linear", "inference_blockers", "linear_modules",
           "attend", "rope_cos_sin", "rope_inv_freq", "apply_rope"]


class RMSNorm(nn.Module):
    """LLaMA/BitNet RMSNorm: computed in float32, weight applied after casting back (as HF does).
    ``groups`` > 1: the mean square per group of features (group normalisation, 2310.11453 Eq. 15)."""

    def __init__(self, dim: int, eps: float = 1e-5, groups: int = 1) -> None:
        super().__init__()
        self.eps, self.groups = eps, groups
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.groups > 1:
            return self.weight * Q.group_rms_norm(x.float(), self.groups, self.eps).to(dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GroupLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose mean and variance are taken per group of features (Group Normalisation
    over the feature dim, 2310.11453 Eq. 15), then the usual affine weight and bias."""

    def __init__(self, dim: int, eps: float = 1e-5, groups: int = 2) -> None:
        super().__init__(dim, eps=eps)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Q.group_layer_norm(x, self.groups, self.eps) * self.weight + self.bias


def make_norm(cfg: ModelConfig, dim: int, sub: bool = False, groups: int = 1) -> nn.Module:
    """The block's norm; ``sub=True`` marks the SubLN sites, which ``cfg.sub_norm=False`` turns into
    identities (a converted LLaMA has no norm there, and an RMSNorm would change its function).
    ``groups`` > 1 takes the statistics per group of features (``cfg.norm_groups``)."""
    if sub and not cfg.sub_norm:
        return nn.Identity()
    if cfg.arch == "bitnet":
        return nn.LayerNorm(dim, eps=cfg.norm_eps) if groups == 1 else GroupLayerNorm(dim, cfg.norm_eps, groups)
    return RMSNorm(dim, cfg.norm_eps, groups)


def act_groups(cfg: ModelConfig, row_parallel: bool) -> int:
    """The activation groups of a projection: ``cfg.act_groups`` everywhere under
    ``group_scope="all"``, only on the row-parallel o/down under ``"parallel"``."""
    return cfg.act_groups if cfg.group_scope == "all" or row_parallel else 1


def norm_groups(cfg: ModelConfig, sub: bool) -> int:
    """The groups of a block norm: ``cfg.norm_groups`` for all four under ``group_scope="all"``,
    only for the sub-norms (in front of o/down) under ``"parallel"``."""
    return cfg.norm_groups if cfg.group_scope == "all" or sub else 1


def make_linear(
    cfg: ModelConfig, d_in: int, d_out: int, bias: bool = False, *, row_parallel: bool = False,
    feeds_activation: bool = False, site: str = "qkv",
) -> nn.Linear:
    """nn.Linear for fp, BitLinear for b1 / b1.58 (norms live in the model, so norm=None here).
    ``row_parallel`` marks o/down (their weight groups split input columns under
    weight_group_dim="parallel"); ``feeds_activation`` marks the projection whose output goes
    into the FFN non-linearity (the η variant's site when ``cfg.act_nonneg``); ``site`` ("qkv", "o",
    "ffn_in", "down") picks the activation treatment of ``cfg.act_variant`` (``config.ACT_VARIANTS``)."""
    if cfg.quant == "fp":
        return nn.Linear(d_in, d_out, bias=bias)
    dim = cfg.weight_group_dim
    if dim == "parallel":
        dim = "in" if row_parallel else "out"
    bits, act_quant, act_topk, hadamard = ACT_VARIANTS[cfg.act_variant][site]
    return BitLinear(
        d_in, d_out, bias=bias, weight_quant=cfg.quant, act_bits=cfg.act_bits if bits is None else bits,
        act_quant=act_quant, act_topk=act_topk, hadamard=hadamard,
        act_granularity=cfg.train_act_granularity, act_granularity_eval=cfg.act_granularity_eval,
        weight_groups=cfg.weight_groups, act_groups=act_groups(cfg, row_parallel), weight_group_dim=dim,
        act_nonneg=cfg.act_nonneg and feeds_activation,
    )


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (HF "rotate_half" convention: dims i and i + d/2 are paired)
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """RoPE's D/2 inverse frequencies θ^(-2i/D), float32; ``scaling`` (``ModelConfig.rope_scaling``)
    applies Llama 3.1's "llama3" rescaling as transformers computes it (float32, same operations):
    wavelengths above original_max_position_embeddings / low_freq_factor are slowed by ``factor``,
    those below original_max_position_embeddings / high_freq_factor kept, the band between
    interpolated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if not scaling:
        return inv_freq
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / lo, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D), float32."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated per-layer key/value tensors, (B, H_kv, max_len, D) each; ``pos`` = tokens seen."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=torch.float32, device=None):
        self.max_len = max_len or cfg.max_seq_len
        shape = (batch, cfg.kv_heads, self.max_len, cfg.head_dim)
        kv = self._zeros(2 * cfg.n_layers, shape, dtype, device)
        self.k, self.v = kv[0::2], kv[1::2]  # layer i's keys, then its values
        self.pos = 0

    @staticmethod
    def _zeros(n: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> list[torch.Tensor]:
        """``n`` zeroed key / value tensors (the packed engine's cache puts them on huge pages)."""
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        if self.pos + t > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos + t} tokens > capacity {self.max_len}")
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        return self.k[layer][:, :, : self.pos + t], self.v[layer][:, :, : self.pos + t]

    def advance(self, t: int) -> None:
        self.pos += t

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, past+T, D); GQA when Hkv < H."""
    B, H, T, D = q.shape
    hkv = k.shape[1]
    if hkv != H:  # GQA: query head h reads kv head h // (H / Hkv) (HF repeat_kv)
        rep = H // hkv
        k = k[:, :, None].expand(B, hkv, rep, k.shape[2], D).reshape(B, H, -1, D)
        v = v[:, :, None].expand(B, hkv, rep, v.shape[2], D).reshape(B, H, -1, D)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
    # query i (absolute position past+i) may attend keys 0..past+i
    kpos = torch.arange(past + T, device=q.device)
    qpos = torch.arange(past, past + T, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kpos[None, :] <= qpos[:, None])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, hd = cfg.d_model, cfg.head_dim
        self.q_proj = make_linear(cfg, d, cfg.n_heads * hd, cfg.qkv_bias)
        self.k_proj = make_linear(cfg, d, cfg.kv_heads * hd, cfg.qkv_bias)
        self.v_proj = make_linear(cfg, d, cfg.kv_heads * hd, cfg.qkv_bias)
        self.attn_sub_norm = make_norm(cfg, cfg.n_heads * hd, sub=True, groups=norm_groups(cfg, True))
        self.o_proj = make_linear(cfg, cfg.n_heads * hd, d, row_parallel=True, site="o")

    def forward(self, h, cos, sin, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = h.shape
        cfg = self.cfg
        # -1 heads: the local ones under tensor parallelism (n_heads / tp, n_kv_heads / tp)
        q = self.q_proj(h).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(h).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(h).view(B, T, -1, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, past+T, D)
        a = attend(q, k, v, past)  # (B, H, T, D)
        a = a.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
        return self.o_proj(self.attn_sub_norm(a))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_model, cfg.ffn_dim
        if cfg.gated_ffn:
            self.gate_proj = make_linear(cfg, d, f, feeds_activation=True, site="ffn_in")
        self.up_proj = make_linear(cfg, d, f, feeds_activation=not cfg.gated_ffn, site="ffn_in")
        self.ffn_sub_norm = make_norm(cfg, f, sub=True, groups=norm_groups(cfg, True))
        self.down_proj = make_linear(cfg, f, d, row_parallel=True, site="down")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.arch
        if arch == "bitnet":
            m = F.gelu(self.up_proj(h))
        elif arch == "bitnet-b1.58":
            m = F.silu(self.gate_proj(h)) * self.up_proj(h)
        else:  # bitnet-2b4t: ReLU² gate
            m = F.relu(self.gate_proj(h)).square() * self.up_proj(h)
        return self.down_proj(self.ffn_sub_norm(m))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.d_model, groups=norm_groups(cfg, False))
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model, groups=norm_groups(cfg, False))
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.d_model)


class BitNetModel(nn.Module):
    """``model(input_ids) -> logits`` (B, T, vocab); ``model(ids, cache=c)`` for incremental decoding."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, σ) init; output projections scaled by 1/√(2L) (GPT-2) so residual growth is bounded."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                nn.init.normal_(p, 0.0, s)
            elif name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V); ``last_only`` computes the head for the last position only (B, 1, V)."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(past, past + T, device=input_ids.device)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if exclude_embeddings and ("embed_tokens" in name or "lm_head" in name):
                continue
            n += p.numel()
        return n

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch, max_len, dtype=p.dtype, device=p.device)


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The projection layers (everything but the output head), in state-dict order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def inference_blockers(cfg: ModelConfig, target: str = "packed") -> list[str]:
    """The options of ``cfg`` that an inference format does not compute, each as "option=value:
    why"; empty when the model can be packed/exported (given a b1/b1.58 quant).  Training and
    eval in torch support all of them.

    ``target="packed"``: bitlm's packed engine, which computes every group option (weight groups
    along either dimension, activation groups, grouped norms, group_scope).  Any other target (a
    foreign runtime: GGUF, HF BitNet) also refuses grouped norms and grouped activations, which
    those graphs do not compute; weight groups are each writer's own business (``bitlm.io``)."""
    out = []
    if target != "packed" and cfg.norm_groups != 1:
        out.append(f"norm_groups={cfg.norm_groups}: {target} runtimes normalise over all features")
    if cfg.quant == "fp":  # plain nn.Linear: the quantisation options below do nothing
        return out
    if cfg.act_variant != "a8" and target != "packed":  # bitlm's own engine computes them
        out.append(f"act_variant={cfg.act_variant!r}: {target} models quantise every activation "
                   "to int8 absmax (no 4-bit absmean, top-K or Hadamard); only bitlm's packed engine runs it")
    if cfg.act_nonneg:
        out.append("act_nonneg=True: packed and exported models quantise activations symmetrically (no η)")
    if target != "packed" and cfg.act_groups != 1:
        out.append(f"act_groups={cfg.act_groups}: {target} runtimes take one absmax per token (or per block)")
    if cfg.act_granularity_eval != "token":
        out.append(f"act_granularity_eval={cfg.act_granularity_eval!r}: packed and exported models quantise "
                   "activations per token")
    return out
