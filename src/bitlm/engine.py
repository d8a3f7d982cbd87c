"""The packed inference engine: ``PackedBitLinear``, packed models for the three architectures,
and the memory-mapped packed model file (``bitlm pack``).

A packed model computes what the torch reference ``BitNetModel`` computes, with the weights as
``PackedWeight`` (i2 / t1 ternary, b1 binary; ``bitlm.packing``) and every projection an exact
integer matmul in the native kernels (``bitlm.kernels``): int8 per-token activations from the
fused RMSNorm + absmax quantiser, int32 accumulation, one float epilogue.  Norms, RoPE, attention
and the residual stream stay float32; the embedding and output head are kept in f32, bf16 or
int8 (per-row absmax scale) by option — for 2B4T the head is the largest read per token.

Group quantisation and normalisation (``ModelConfig`` weight_groups / weight_group_dim /
act_groups / norm_groups / group_scope, 2310.11453 Eq. 13-15) run exactly as the torch model
defines them: output-row weight groups are one scale per row group; input-column weight groups
and activation groups are K-slices (``bitlm.packing``), one int32 GEMM per slice and a fixed-order
float sum (``bitlm.kernels.reference.sliced_matmul``); grouped norms take their statistics per
feature slice.  A grouped model decodes on the per-op path (the fused native decode step,
``csrc/decode.c``, runs ungrouped models only).
Models with ``act_variant`` a4.8 / v2-a8 / v2-a4 (BitNet a4.8, BitNet v2) run the same products
on other activations: the norm in torch, the native Hadamard transform where the variant has it,
then 4-bit absmean codes (or int8 top-K masked) in int8 containers — the int8 × ternary integer sums
are then exactly the int4 × ternary ones.  They decode on the per-op path.  The torch model and the
engine agree to float rounding, except that a4.8's top-K can break a near-tie at the K-th |x|
differently (the two compute the attention output in different float orders).

The packed file (``.bitlm``) format is ``bitlm.io.packed``'s; this module maps a
``PackedModel`` to and from its header and named tensors (``save_packed`` / ``load_packed``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels, memory
from . import quant as Q
from .config import ACT_VARIANTS, ModelConfig
from .io.packed import MAGIC, VERSION, PackedFormatError, read_header, read_packed, write_packed
from .model import KVCache, act_groups, inference_blockers, norm_groups, rope_cos_sin
from .packing import PackedWeight, get_format, pack_weight, slice_scales

__all__ = ["PackedBitLinear", "PackedModel", "PackedKVCache", "KVPool", "kv_bytes_per_token", "convert", "pack", "save_packed", "load_packed", "PackedFormatError",
           "read_header", "MAGIC", "VERSION", "add_arguments", "run"]

DENSE_TYPES = ("f32", "bf16", "int8")
#: Output-head-only storage: 6 / 4-bit rows with one f16 scale per 32 columns (bitlm.packing.pack_head),
#: read with int8 activations (W6A8 / W4A8).  Not for embeddings (rows are read per token).
LOWBIT_HEADS = {"int6": 6, "int4": 4}
HEAD_TYPES = DENSE_TYPES + tuple(LOWBIT_HEADS)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class PackedBitLinear:
    """Inference BitLinear: y = s·T · quant(norm(x)) with T packed; exact integer matmul."""

    def __init__(self, w: PackedWeight, norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                 rmsnorm: bool = False) -> None:
        self.w, self.norm_weight, self.eps, self.rmsnorm = w, norm_weight, eps, rmsnorm

    @classmethod
    def from_bitlinear(cls, lin, format: str = "i2") -> PackedBitLinear:
        """Pack a trained ``BitLinear`` (its built-in norm, if RMSNorm, is fused into the kernel)."""
        if lin.norm == "layernorm":
            raise ValueError("PackedBitLinear fuses RMSNorm only; apply LayerNorm before the layer")
        if lin.act_nonneg:
            raise ValueError("PackedBitLinear packs symmetric activations only (act_nonneg=True)")
        m = cls(_pack_linear(lin, format, own_norm=True), None, lin.norm_eps, lin.norm == "rmsnorm")
        m.groups = lin.act_groups  # BitLinear's built-in norm takes its statistics per act group too
        return m

    groups = 1  # activation (and built-in norm) groups

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.w, None, self.norm_weight, self.eps, rmsnorm=self.rmsnorm or None,
                              groups=self.groups)


class Dense:
    """A high-precision matrix (embedding table / output head) stored as f32, bf16 or int8 rows —
    or, for an output head only, int6 / int4 groups (``weight`` the packed bytes, ``scale`` the
    f16 group scales, ``shape`` (V, d); see ``bitlm.packing.pack_head``)."""

    def __init__(self, kind: str, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 shape: tuple[int, int] | None = None) -> None:
        if kind not in HEAD_TYPES:
            raise ValueError(f"dense type must be one of {HEAD_TYPES}, got {kind!r}")
        self.kind, self.weight, self.scale = kind, weight, scale  # scale: (V,) float32 for int8
        self.shape = tuple(shape) if shape is not None else tuple(weight.shape)
        self.bits = LOWBIT_HEADS.get(kind)

    @classmethod
    def from_float(cls, kind: str, w: torch.Tensor) -> Dense:
        w = w.detach().float()
        if kind in LOWBIT_HEADS:
            from .packing import pack_head

            data, scale = pack_head(w, LOWBIT_HEADS[kind])
            return cls(kind, data, scale, tuple(w.shape))
        if kind == "f32":
            return cls(kind, w.contiguous())
        if kind == "bf16":
            return cls(kind, w.to(torch.bfloat16).contiguous())
        # int8 per row: the same absmax rule as activations (bitlm.quant)
        from .quant import activation_quantize

        q, a = activation_quantize(w)
        return cls(kind, q.to(torch.int8).contiguous(), (1.0 / a.reshape(-1)).contiguous())

    #: rows per slice in :meth:`from_float_rows` (a multiple of the low-bit heads' 8,192-row
    #: packing blocks, so the slices pack to the same bytes as the whole matrix)
    ROW_SLICE = 1 << 13

    @classmethod
    def from_float_rows(cls, kind: str, read: Any, shape: tuple[int, int]) -> Dense:
        """:meth:`from_float` of a (V, d) matrix read ``ROW_SLICE`` rows at a time by
        ``read(start, stop)`` → float32 rows: the same result (every kind is row-independent) with
        one slice's temporaries instead of the whole float matrix (except kind "f32", which is it)."""
        n = shape[0]
        parts = [cls.from_float(kind, read(r, min(r + cls.ROW_SLICE, n))) for r in range(0, n, cls.ROW_SLICE)]
        weight = torch.cat([p.weight for p in parts])
        scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
        return cls(kind, weight, scale, tuple(shape))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup → float32 (..., d)."""
        if self.bits is not None:
            raise ValueError(f"an {self.kind} matrix is an output head only; embeddings are f32, bf16 or int8")
        r = self.weight[ids]
        if self.kind == "int8":
            return r.float() * self.scale[ids].unsqueeze(-1)
        return r.float()

    def matmul(self, x: torch.Tensor, rowwise: bool = False) -> torch.Tensor:
        """Output head: float32 (M, d) → (M, V) logits.  ``rowwise``: each row's logits are the
        same bits as for that row alone (the native bf16/int8 heads always are; an f32 head then
        runs one product per row, since BLAS sums in another order for M > 1)."""
        if self.kind == "f32":
            if rowwise and x.shape[0] > 1:
                return torch.cat([F.linear(r, self.weight) for r in x.split(1)])
            return F.linear(x, self.weight)
        if self.kind == "bf16":  # float32 x, bf16 rows read as is (2 bytes per weight)
            return kernels.dense_bf16_matmul(x, self.weight)
        if self.bits is not None:
            raise ValueError(f"an {self.kind} head is read with quantised activations (matmul_q)")
        return kernels.dense_int8_matmul(x, self.weight, self.scale)

    def matmul_q(self, xq: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Head read with int8 activations (xq, a) from ``kernels.quantize_rows``: W8A8 for an
        int8 head, W6A8 / W4A8 for the low-bit heads; exact integer sums (row-independent)."""
        if self.bits is not None:
            return kernels.dense_lowbit_matmul(xq, a, self.weight, self.scale, self.bits, self.shape[0])
        if self.kind != "int8":
            raise ValueError(f"int8 activations need an int8, int6 or int4 head, this one is {self.kind}")
        return kernels.dense_int8a8_matmul(xq, a, self.weight, self.scale)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        d = {f"{prefix}.weight": self.weight}
        if self.scale is not None:
            d[f"{prefix}.scale"] = self.scale
        return d

    @property
    def nbytes(self) -> int:
        sc = self.scale.numel() * self.scale.element_size() if self.scale is not None else 0
        return self.weight.numel() * self.weight.element_size() + sc


#: Prefill runs the FFN in blocks of this many rows (its 2 x ffn_dim wide intermediates are the
#: largest temporaries; 64 and 128 measured the same speed).
FFN_ROW_BLOCK = 128


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
    """``bitlm.model.attend`` with SDPA's own GQA (no repeated k/v copies)."""
    T = q.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
    kpos = torch.arange(past + T)
    qpos = torch.arange(past, past + T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=kpos[None, :] <= qpos[:, None], enable_gqa=gqa)


@dataclass
class PackedLayer:
    # weights
    q: PackedWeight
    k: PackedWeight
    v: PackedWeight
    o: PackedWeight
    up: PackedWeight  # gate and up fused in one grouped weight (groups=2) for gated FFNs
    down: PackedWeight
    # norms (float32); bitnet arch: LayerNorm weight and bias; sub-norms None when cfg.sub_norm=False
    input_norm: torch.Tensor
    attn_sub_norm: torch.Tensor | None
    post_norm: torch.Tensor
    ffn_sub_norm: torch.Tensor | None
    input_norm_b: torch.Tensor | None = None
    attn_sub_norm_b: torch.Tensor | None = None
    post_norm_b: torch.Tensor | None = None
    ffn_sub_norm_b: torch.Tensor | None = None
    # q/k/v biases (Qwen2-style converted models)
    q_b: torch.Tensor | None = None
    k_b: torch.Tensor | None = None
    v_b: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# The packed model
# ---------------------------------------------------------------------------------------------


class PackedModel:
    """``model(ids, cache=None) -> logits`` like ``BitNetModel``, on packed weights.

    Has the same ``config``, ``new_cache`` and call signature, so ``bitlm.generate`` drives both.
    """

    def __init__(self, cfg: ModelConfig, layers: list[PackedLayer], embed: Dense, head: Dense,
                 final_norm: torch.Tensor, final_norm_b: torch.Tensor | None = None, format: str = "i2",
                 tokenizer_json: str | None = None) -> None:
        self.config, self.layers, self.embed, self.head = cfg, layers, embed, head
        self.final_norm, self.final_norm_b = final_norm, final_norm_b
        self.format = format
        self.tokenizer_json = tokenizer_json
        self._mmap = None  # keeps the mapped file alive

    # -- nn.Module look-alikes used by generate / eval -------------------------------------------
    def eval(self) -> PackedModel:
        return self

    def train(self, mode: bool = True) -> PackedModel:
        if mode:
            raise RuntimeError("a packed model is inference-only; train the checkpoint instead")
        return self

    training = False

    #: KV cache type of new caches: "f16" (default), "f32" or "int8" (per token, per head scales);
    #: a runtime choice (``--kv`` on generate / chat / serve / eval), never stored in the file.
    KV_TYPES = ("f16", "f32", "int8")
    _kv = "f16"

    @property
    def kv(self) -> str:
        return self._kv

    @kv.setter
    def kv(self, kind: str) -> None:
        if kind not in self.KV_TYPES:
            raise ValueError(f"--kv {kind}: the KV cache type must be one of {self.KV_TYPES}")
        self._kv = kind

    def new_cache(self, batch: int = 1, max_len: int | None = None, kv: str | None = None) -> PackedKVCache:
        return PackedKVCache(self.config, batch, max_len, kv or self._kv)

    def to_hugepages(self) -> PackedModel:
        """Move the weights into one huge-page buffer where ``bitlm.memory.worth_it``; returns self.
        ``convert`` and ``convert_gguf`` call it, ``load_packed`` reads the file into one anyway;
        a model assembled by hand from ``PackedLayer`` s can call it before decoding.  Decode
        streams every weight each token, 10-16 % faster than from 4 KiB pages.  The same tensors,
        values and bits.  Call it before the first decode: a native decoder bound to this model
        holds the old addresses."""
        memory.relocate(list(_tensor_table(self)[0].values()))
        return self

    def weight_bytes(self) -> dict[str, int]:
        lin = sum(w.nbytes for L in self.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
        tied = self.head is self.embed  # a tied model with an int6 / int4 head stores both
        return {"linear": lin, "embedding": self.embed.nbytes, "head": 0 if tied else self.head.nbytes}

    # -- forward ---------------------------------------------------------------------------------
    def _norm_quant(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, site: str = "qkv"):
        """The norm before a BitLinear, fused with int8 quantisation (RMSNorm) or in torch (LN).
        ``site`` ("qkv", "o", "ffn_in", "down"): the projections it feeds — for ``act_variant``,
        and o/down are the sub-norm sites (their norm and activation groups under
        group_scope="parallel"); grouped sites return ``a`` of shape (M, act groups)."""
        cfg = self.config
        if cfg.act_variant != "a8":
            return self._variant_quant(x, w, b, site)
        sub = site in ("o", "down")
        ng, ag = norm_groups(cfg, sub), act_groups(cfg, sub)
        if w is None:  # no norm at this site (sub_norm=False)
            return kernels.quantize_rows(x, groups=ag)
        if cfg.arch == "bitnet":
            if ng == 1:
                h = F.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_eps)
            else:  # bitlm.model.GroupLayerNorm, the same torch ops
                h = Q.group_layer_norm(x, ng, cfg.norm_eps) * w + b
            return kernels.quantize_rows(h, groups=ag)
        if ng == ag:
            return kernels.quantize_rows(x, w, cfg.norm_eps, groups=ag)
        return kernels.quantize_rows(kernels.reference.rms_norm_rows(x, w, cfg.norm_eps, ng), groups=ag)

    def _variant_quant(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, site: str):
        """BitNet a4.8 / v2 activations (``config.ACT_VARIANTS``): the norm as ``bitlm.model``
        computes it (torch), the Hadamard transform (native op), then 4-bit absmean codes — or
        int8 absmax, top-K masked at a4.8's o_proj — in int8 containers: the int8 × ternary GEMM
        then gives the exact int4 × ternary sums, with the usual ``s / a`` epilogue."""
        cfg = self.config
        bits, act_quant, topk, had = ACT_VARIANTS[cfg.act_variant][site]
        if w is None:
            h = x
        elif cfg.arch == "bitnet":
            h = F.layer_norm(x, (x.shape[-1],), w, b, cfg.norm_eps)
        else:
            h = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps))
        if had:
            h = kernels.hadamard(h)
        if act_quant == "absmean":
            return kernels.quantize_rows_absmean(h, bits)
        xq, a = kernels.quantize_rows(h)
        if topk is not None:
            from .quant import topk_mask

            xq = xq * topk_mask(h, topk)
        return xq, a

    def __call__(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        return self.forward(input_ids, cache, last_only)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with ``last_only`` only the last position's (B, 1, V) — a prefill for
        generation then never materialises T x V logits (263 MB for 512 tokens of a 128k vocab)."""
        cfg = self.config
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if past + T > cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len={cfg.max_seq_len}")
        if B == 1 and T == 1 and cache is not None and self._fused_decode_ok():
            return self._decode_fused(input_ids, cache)
        cos, sin = rope_cos_sin(torch.arange(past, past + T), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        if B > 1:  # one (cos, sin) row per (sequence, position) row
            cos, sin = cos.repeat(B, 1), sin.repeat(B, 1)
        x = self.embed.rows(input_ids).reshape(B * T, cfg.d_model)  # (B*T, d) float32, a fresh tensor
        H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Peak memory is a prefill's: temporaries are dropped as soon as they are dead, RoPE and
        # the gating run in place on fresh tensors, and long inputs run the FFN (whose 2 x ffn_dim
        # wide intermediates dominate) in row blocks — rows are independent there.  Measured on
        # the 2B4T shape, 512 tokens: 90 -> 20 MiB of temporaries, same bits.
        for i, L in enumerate(self.layers):
            xq, a = self._norm_quant(x, L.input_norm, L.input_norm_b)
            # RoPE in place on the (B*T, heads, D) rows, then (B, heads, T, D) views
            q = kernels.rope_rows_(kernels.matmul(xq, a, L.q, L.q_b).view(B * T, H, D), cos, sin)
            k = kernels.rope_rows_(kernels.matmul(xq, a, L.k, L.k_b).view(B * T, Hkv, D), cos, sin)
            q, k = q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2)
            v = kernels.matmul(xq, a, L.v, L.v_b).view(B, T, Hkv, D).transpose(1, 2)
            del xq, a
            if cache is not None:
                k, v = cache.update(i, k, v)
            elif self._kv != "f32":  # no cache: the same rounding points, so eval sees the KV type
                k, v = PackedKVCache.read_back(k, self._kv), PackedKVCache.read_back(v, self._kv)
            att = _attend(q, k, v, past).transpose(1, 2).reshape(B * T, H * D)  # (B*T, H*D)
            del q, k, v
            aq, aa = self._norm_quant(att, L.attn_sub_norm, L.attn_sub_norm_b, "o")
            del att
            x = self._out_and_ffn(L, x, aq, aa)
            del aq, aa
        if cache is not None:
            cache.advance(T)
        if last_only:
            x, T = x.view(B, T, -1)[:, -1], 1
        return self._final(x, B, T)

    def _out_and_ffn(self, L: PackedLayer, x: torch.Tensor, aq: torch.Tensor, aa: torch.Tensor) -> torch.Tensor:
        """The rest of a block after attention, for (M, d) rows: x + o(att) from the attention
        output's codes (aq, aa), then + FFN — in row blocks of FFN_ROW_BLOCK for long inputs (its
        2 x ffn_dim wide intermediates are the largest temporaries; rows are independent, so the
        same bits)."""
        x = x + kernels.matmul(aq, aa, L.o)  # a fresh tensor: the FFN below may add in place
        if x.shape[0] > FFN_ROW_BLOCK:
            for r in range(0, x.shape[0], FFN_ROW_BLOCK):
                xs = x[r : r + FFN_ROW_BLOCK]
                xs += self._ffn(L, xs)
            return x
        return x + self._ffn(L, x)

    def _ffn(self, L: PackedLayer, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sub-layer of (M, d) rows (without the residual add)."""
        cfg = self.config
        hq, ha = self._norm_quant(x, L.post_norm, L.post_norm_b, "ffn_in")
        u = kernels.matmul(hq, ha, L.up)
        del hq, ha
        if cfg.arch == "bitnet":
            m = F.gelu(u)
        elif cfg.arch != "bitnet-b1.58":  # ReLU²: one native pass (kernels.glu_relu2, the same bits)
            m = kernels.glu_relu2(u)
        else:
            g, u = u.chunk(2, dim=-1)  # gate rows first, then up (see convert())
            m = F.silu(g) if cfg.arch == "bitnet-b1.58" else F.relu(g).square_()
            m.mul_(u)  # act(g) * u, in place on the fresh act(g)
            del g
        del u
        mq, ma = self._norm_quant(m, L.ffn_sub_norm, L.ffn_sub_norm_b, "down")
        del m
        return kernels.matmul(mq, ma, L.down)

    #: Activations of the output head: "f32" (the normed hidden state as is) or "int8" — quantised
    #: per token like every BitLinear input, then an exact int8 x int8 product (W8A8, as llama.cpp
    #: reads a q8_0 head); needs an int8 head, and decode reads it at memory speed.
    HEAD_ACTS = ("f32", "int8")
    _head_act = "f32"

    @property
    def head_act(self) -> str:
        return "int8" if self.head.bits is not None else self._head_act  # low-bit heads: always int8

    @head_act.setter
    def head_act(self, mode: str) -> None:
        if mode not in self.HEAD_ACTS:
            raise ValueError(f"head_act must be one of {self.HEAD_ACTS}, got {mode!r}")
        if mode == "int8" and self.head.kind not in ("int8", *LOWBIT_HEADS):
            raise ValueError(f"head_act='int8' needs an int8 output head, this model's is {self.head.kind} "
                             "(pack it with --head int8)")
        if mode == "f32" and self.head.bits is not None:
            raise ValueError(f"head_act='f32': this model's {self.head.kind} head is read with int8 activations only")
        self._head_act = mode

    def _final(self, x: torch.Tensor, B: int, T: int, rowwise: bool = False) -> torch.Tensor:
        """Final norm + output head: (B*T, d) → logits (B, T, V); ``rowwise`` see ``Dense.matmul``."""
        cfg = self.config
        if self.head_act == "int8":  # fused RMSNorm + quantiser (LayerNorm in torch), W8A8 / W6A8 / W4A8
            if cfg.arch == "bitnet":
                xq, a = kernels.quantize_rows(F.layer_norm(x, (cfg.d_model,), self.final_norm, self.final_norm_b,
                                                           cfg.norm_eps))
            else:
                xq, a = kernels.quantize_rows(x, self.final_norm, cfg.norm_eps)
            return self.head.matmul_q(xq, a).view(B, T, -1)
        if cfg.arch == "bitnet":
            h = F.layer_norm(x, (cfg.d_model,), self.final_norm, self.final_norm_b, cfg.norm_eps)
        else:
            xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
            h = self.final_norm * xf
        return self.head.matmul(h, rowwise).view(B, T, -1)

    # -- batched decode (serving) ----------------------------------------------------------------
    @torch.inference_mode()
    def decode_batch(self, input_ids: torch.Tensor | list[int], caches: list[KVCache],
                     prompts: list[list[int]] | None = None, prompt_caches: list[KVCache] | None = None) -> torch.Tensor:
        """One decode step of N independent sequences: token ``input_ids[i]`` at position
        ``caches[i].pos`` of sequence i, each with its own (batch-1) cache → logits (N, V).

        Every projection runs once for all N rows (the kernels' GEMM with M = N: the weights are
        read once per step); attention runs per sequence over its own cache — with the native
        kernels RoPE, the cache rows and the attention of all N sequences are one call per layer
        (``native.BatchAttention``, the fused step's arithmetic), else torch's SDPA per sequence.
        Activations are quantised per token and the integer products are exact, so row i's
        logits are the same bits whatever else is in the batch; with the native attention also
        the fused native step's bits (ReLU² models), with ``batch_attention = False`` the per-op
        single-sequence path's (``forward`` with ``fused_decode = False``).  A batch of one runs
        as the fused step itself where the bits are the same (``_alone_is_fused``).

        ``prompts`` (with their own fresh or partly filled ``prompt_caches``): prefills of joining
        sequences folded into the same pass — their T_j rows go through the same projections as
        the decode rows (the weights are read once for all of them), their attention is
        ``forward``'s; the result gains one row per prompt, its last position's logits, the same
        bits as ``forward(prompt, cache, last_only=True)`` for a prompt of 2 or more tokens."""
        cfg = self.config
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        N = ids.numel()
        prompts = [list(map(int, p_)) for p_ in (prompts or [])]
        prompt_caches = list(prompt_caches or [])
        if N != len(caches) or N + len(prompts) == 0:
            raise ValueError(f"decode_batch: {N} tokens for {len(caches)} caches")
        if len(prompts) != len(prompt_caches) or any(len(p_) < 2 for p_ in prompts):
            raise ValueError(f"decode_batch: {len(prompts)} prompts (of 2 or more tokens each) for "
                             f"{len(prompt_caches)} caches")
        if N == 1 and not prompts and self._alone_is_fused(caches[0]):  # the fused step: the same bits
            return self._decode_fused(ids.view(1, 1), caches[0]).view(1, -1)
        pos = [c.pos for c in caches]
        spans = [(c.pos, len(p_)) for c, p_ in zip(prompt_caches, prompts)]
        for (p_, t), c in zip([(q, 1) for q in pos] + spans, caches + prompt_caches):
            if p_ + t > cfg.max_seq_len:
                raise ValueError(f"sequence of {p_ + t} tokens exceeds max_seq_len={cfg.max_seq_len}")
            if p_ + t > c.max_len:
                raise ValueError(f"KV cache overflow: {p_ + t} tokens > capacity {c.max_len}")
        H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        if N:
            # (N, D), contiguous: one position per row
            cos, sin = rope_cos_sin(torch.tensor(pos), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        batt = self._batch_attention(caches) if N else None
        p_rope = [rope_cos_sin(torch.arange(past, past + t), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
                  for past, t in spans]
        if (batt is not None and N >= 2 and not prompts and self.rows_decode
                and os.environ.get("BITLM_DECODE_ROWS", "1") != "0" and self._alone_is_fused(caches[0])):
            x = self.embed.rows(ids).reshape(N, cfg.d_model).contiguous()
            self._rows_decoder(getattr(caches[0], "kv", "f32")).rows(x, batt, cos, sin)
            for c in caches:
                c.advance(1)
            return self._final(x, N, 1, rowwise=True).view(N, -1)
        starts = [N + sum(t for _, t in spans[:j]) for j in range(len(spans))]
        R = N + sum(t for _, t in spans)
        all_ids = torch.cat([ids, *(torch.tensor(p_, dtype=torch.long) for p_ in prompts)])
        x = self.embed.rows(all_ids).reshape(R, cfg.d_model)
        for i, L in enumerate(self.layers):
            xq, a = self._norm_quant(x, L.input_norm, L.input_norm_b)
            q_all = kernels.matmul(xq, a, L.q, L.q_b)
            k_all = kernels.matmul(xq, a, L.k, L.k_b)
            v_all = kernels.matmul(xq, a, L.v, L.v_b)
            del xq, a
            att = torch.empty(R, H * D) if prompts else None
            if N:
                q, k, v = q_all[:N].view(N, H, D), k_all[:N].view(N, Hkv, D), v_all[:N].view(N, Hkv, D)
                if batt is not None:  # RoPE, cache rows and attention of all N sequences: one native call
                    att_d = batt.run(i, q, k, v, cos, sin)
                else:
                    q, k = kernels.rope_rows_(q, cos, sin), kernels.rope_rows_(k, cos, sin)
                    att_d = torch.empty(N, H * D)
                    for j, c in enumerate(caches):  # (1, H, 1, D) queries over this sequence's own keys
                        kc, vc = c.update(i, k[j].view(1, Hkv, 1, D), v[j].view(1, Hkv, 1, D))
                        att_d[j] = _attend(q[j].view(1, H, 1, D), kc, vc, pos[j]).reshape(H * D)
                if att is None:
                    att = att_d
                else:
                    att[:N] = att_d
                del q, k, v, att_d
            for (past, t), s0, c, (pc, ps) in zip(spans, starts, prompt_caches, p_rope):  # as forward
                q = kernels.rope_rows_(q_all[s0 : s0 + t].view(t, H, D), pc, ps).view(1, t, H, D).transpose(1, 2)
                k = kernels.rope_rows_(k_all[s0 : s0 + t].view(t, Hkv, D), pc, ps).view(1, t, Hkv, D).transpose(1, 2)
                v = v_all[s0 : s0 + t].view(1, t, Hkv, D).transpose(1, 2)
                k, v = c.update(i, k, v)
                att[s0 : s0 + t] = _attend(q, k, v, past).transpose(1, 2).reshape(t, H * D)
                del q, k, v
            del q_all, k_all, v_all
            aq, aa = self._norm_quant(att, L.attn_sub_norm, L.attn_sub_norm_b, "o")
            del att
            x = self._out_and_ffn(L, x, aq, aa)
            del aq, aa
        for c in caches:
            c.advance(1)
        for c, (_, t) in zip(prompt_caches, spans):
            c.advance(t)
        if prompts:
            x = x[[*range(N), *(s0 + t - 1 for s0, (_, t) in zip(starts, spans))]]
        M = x.shape[0]
        return self._final(x, M, 1, rowwise=True).view(M, -1)

    #: decode_batch's attention: the native batched call (``bitlm_attn_batch``: RoPE, cache rows
    #: and attention of every sequence in one pass, the fused step's rounding) when the native
    #: kernels are in use; False (or env BITLM_BATCH_ATTN=0) runs torch's SDPA per sequence, the
    #: per-op path's attention (then every logit is the per-op path's bits).
    batch_attention = True

    def _alone_is_fused(self, cache: KVCache) -> bool:
        """Whether one sequence's batched step may run as the fused native step: where the two
        give the same bits (ReLU² models with the native batched attention — tested in
        tests/test_batched_decode.py), so a request's tokens do not depend on running alone."""
        return (self.config.arch == "bitnet-2b4t" and self._fused_decode_ok() and self._batch_attention_ok([cache])
                and cache.pos + 1 <= min(cache.max_len, self.config.max_seq_len))  # else the errors below

    def _batch_attention_ok(self, caches: list[KVCache]) -> bool:
        if not self.batch_attention or os.environ.get("BITLM_BATCH_ATTN", "1") == "0":
            return False
        if kernels.backend() != "native":
            return False
        kinds = {getattr(c, "kv", "f32") for c in caches}
        # mixed cache types or batch > 1 caches: the per-sequence torch loop
        return len(kinds) == 1 and all(c.k[0].shape[0] == 1 for c in caches)

    def _batch_attention(self, caches: list[KVCache]):
        if not self._batch_attention_ok(caches):
            return None
        kind = getattr(caches[0], "kv", "f32")  # one kind: _batch_attention_ok checked it
        from .kernels import native

        cfg = self.config
        return native.BatchAttention(caches, kind, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.n_layers)

    # -- fused native decode ---------------------------------------------------------------------
    #: Decode one token per native call (``bitlm_decode_step``) when the native kernels are in
    #: use; False (or env BITLM_FUSED_DECODE=0) runs the per-op path above, its reference twin.
    fused_decode = True

    def _fused_decode_ok(self) -> bool:
        if not self.fused_decode or os.environ.get("BITLM_FUSED_DECODE", "1") == "0":
            return False
        if self.config.arch == "bitnet" or self.config.act_variant != "a8":  # LayerNorm + GELU, non-gated
            return False  # FFN, or 4-bit / Hadamard activations: the per-op path
        if _grouped(self.config):  # group quantisation / normalisation: per-op path (decode.c has none)
            return False
        if kernels.backend() != "native":
            return False
        ok = self.__dict__.get("_native_layers")
        if ok is None:  # the layers' formats do not change: checked once (~20 us per token otherwise)
            ok = self._native_layers = all(w.fmt.native_id is not None
                                           for L in self.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
        return ok

    def _decoder(self, cache: KVCache):
        """The native decoder bound to this model and this cache (built once per cache)."""
        key = getattr(cache, "_bitlm_decoder", None)
        if key is not None and key[0] is self:
            return key[1]
        blocks = self._decoder_blocks()
        for i, b in enumerate(blocks):
            b.update(k_cache=cache.k[i], v_cache=cache.v[i])
        kv = getattr(cache, "kv", "f32")  # a plain model.KVCache is float32
        if kv == "int8":
            for i, b in enumerate(blocks):
                b.update(k_scale=cache.k_scale[i], v_scale=cache.v_scale[i])
        dec = self._native_decoder(blocks, cache.max_len, kv)
        cache._bitlm_decoder = (self, dec)
        return dec

    def _decoder_blocks(self) -> list[dict]:
        return [dict(q=L.q, k=L.k, v=L.v, o=L.o, up=L.up, down=L.down, q_b=L.q_b, k_b=L.k_b, v_b=L.v_b,
                     input_norm=L.input_norm, attn_sub_norm=L.attn_sub_norm, post_norm=L.post_norm,
                     ffn_sub_norm=L.ffn_sub_norm) for L in self.layers]

    def _native_decoder(self, blocks: list[dict], max_len: int | None, kv: str):
        from .kernels import native

        cfg = self.config
        return native.Decoder(d_model=cfg.d_model, n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                              ffn_dim=cfg.ffn_dim, max_len=max_len,
                              act="silu" if cfg.arch == "bitnet-b1.58" else "relu2", eps=cfg.norm_eps, blocks=blocks,
                              kv=kv)

    #: decode_batch of 2 or more sequences (no prompts folded in) as one native call
    #: (``bitlm_decode_rows``: the per-op path's kernels in its order, the same bits) where the
    #: batch could run the fused step alone (ReLU² models, native batched attention); False (or
    #: env BITLM_DECODE_ROWS=0) runs the per-op path, its twin.
    rows_decode = True

    def _rows_decoder(self, kv: str):
        """The weights-only native decoder for ``kv`` caches (built once per model and KV type)."""
        decs = self.__dict__.setdefault("_rows_decoders", {})
        if kv not in decs:
            decs[kv] = self._native_decoder(self._decoder_blocks(), None, kv)
        return decs[kv]

    def _rope_rows(self, pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE factors of position ``pos`` from a table of the first ``n`` positions, built once
        per model (and again only for a longer cache): computing them per token took ~80 us of
        Python and torch dispatch.  ``rope_cos_sin`` gives a position the same bits alone or in a
        batch (elementwise ops; tests/test_fused_decode.py checks every row)."""
        cfg = self.config
        if pos >= n:  # past the cache: the step refuses it with the usual error
            return rope_cos_sin(torch.tensor([pos]), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        tab = self._rope_table_for(n)
        return tab[0][pos], tab[1][pos]

    def _rope_table_for(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) table of at least the first ``n`` positions (built, or grown, on demand)."""
        tab = self.__dict__.get("_rope_table")
        if tab is None or tab[0].shape[0] < n:
            cfg = self.config
            tab = self._rope_table = rope_cos_sin(torch.arange(n), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return tab

    #: With the fused step, also run the embedding row, the final norm and an int8-activation head
    #: (int8a8 / int6 / int4) in the same native call (``bitlm_decode_token``: the same calls in C,
    #: the same bits); False (or env BITLM_FUSED_TOKEN=0) keeps them in Python around the step.
    fused_token = True

    def _token_ok(self) -> bool:
        ok = self.__dict__.get("_token_kinds")
        if ok is None:  # the embedding and head kinds do not change: checked once
            ok = self._token_kinds = self.embed.bits is None and (self.head.bits is not None or self.head.kind == "int8")
        return ok and self.fused_token and self.head_act == "int8" and os.environ.get("BITLM_FUSED_TOKEN", "1") != "0"

    def _bind_token(self, dec, n: int) -> None:
        """Point ``dec`` (a cache's native decoder) at the embedding, head and the RoPE table of
        ``n`` >= cache positions (again only when the table was rebuilt)."""
        tab = self._rope_table_for(n)
        if getattr(dec, "_token_tab", None) is tab[0]:
            return
        e, h = self.embed, self.head
        dec.bind_token(embed=e.weight, embed_scale=e.scale if e.kind == "int8" else None, final_norm=self.final_norm,
                       head=h.weight, head_scale=h.scale, head_bits=h.bits or 8, vocab=self.config.vocab_size,
                       cos_tab=tab[0], sin_tab=tab[1])
        dec._token_tab = tab[0]

    def decode_greedy(self, token: int, cache: KVCache) -> int | None:
        """The next token at temperature 0 after ``token`` (at position ``cache.pos``, batch 1):
        ``argmax(self(token, cache)[0, -1])`` — the first of tied maxima, as ``sample_next`` picks
        it — in one native call (``bitlm_decode_token_greedy``), with no logits tensor made.  None
        (nothing run) where that call does not apply: then use ``self(...)`` and ``sample_next``."""
        if cache.pos >= cache.max_len or not self._fused_decode_ok() or not self._token_ok():
            return None
        dec = self._decoder(cache)
        self._bind_token(dec, cache.max_len)
        nxt = dec.token_greedy(token, cache.pos)
        cache.advance(1)
        return nxt

    def _decode_fused(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cfg = self.config
        pos = cache.pos
        dec = self._decoder(cache)
        if pos < cache.max_len and self._token_ok():  # one native call for the whole token
            self._bind_token(dec, cache.max_len)
            logits = dec.token(int(input_ids), pos)
            cache.advance(1)
            return logits.view(1, 1, -1)
        x = self.embed.rows(input_ids.reshape(1)).reshape(cfg.d_model).contiguous()  # a fresh copy
        cos, sin = self._rope_rows(pos, cache.max_len)
        dec.step(x, pos, cos, sin)
        cache.advance(1)
        return self._final(x.view(1, cfg.d_model), 1, 1)


class PackedKVCache(KVCache):
    """The packed engine's KV cache: ``kv`` = "f32", "f16" or "int8" storage, (B, H_kv, max_len, D)
    per layer (int8 adds float32 (B, H_kv, max_len) ``k_scale`` / ``v_scale``: one scale per
    token and head).  A row is rounded once, when written, exactly as the fused native step
    stores it (``BITLM_KV_*`` in csrc/bitlm_kernels.h): f16 round-to-nearest-even; int8
    ``s = amax / 127``, ``q = clamp(round_half_even(x / s), -127, 127)``.  :meth:`update`
    returns the float32 values read back (``float(f16)``, ``float(q) * s``), so every
    attention — prefill, per-op decode, batched decode — sees what the fused step sees."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, kv: str = "f16") -> None:
        dtypes = {"f32": torch.float32, "f16": torch.float16, "int8": torch.int8}
        if kv not in dtypes:
            raise ValueError(f"--kv {kv}: the KV cache type must be one of {tuple(dtypes)}")
        super().__init__(cfg, batch, max_len, dtype=dtypes[kv])
        self.kv = kv
        if kv == "int8":
            shape = (batch, cfg.kv_heads, self.max_len)
            self.k_scale = [torch.zeros(shape) for _ in range(cfg.n_layers)]
            self.v_scale = [torch.zeros(shape) for _ in range(cfg.n_layers)]

    @staticmethod
    def _zeros(n: int, shape: tuple[int, ...], dtype: torch.dtype, device) -> list[torch.Tensor]:
        """On huge pages where the OS offers them (``bitlm.memory``): decode reads every layer's
        keys and values up to the current position each token."""
        if device is not None and torch.device(device).type != "cpu":
            return KVCache._zeros(n, shape, dtype, device)
        return memory.zeros(n, shape, dtype)

    @staticmethod
    def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (..., D) → (int8 (..., D), float32 (...,)) per row (the int8 cache's rounding)."""
        s = x.abs().amax(-1) / 127.0
        sd = s.unsqueeze(-1)
        q = torch.where(sd > 0, torch.round(x / torch.where(sd > 0, sd, 1.0)), 0.0).clamp_(-127, 127)
        return q.to(torch.int8), s

    @classmethod
    def read_back(cls, x: torch.Tensor, kv: str) -> torch.Tensor:
        """float32 x as a ``kv`` cache would store and return it (the rounding of :meth:`update`)."""
        if kv == "f16":
            return x.to(torch.float16).float()
        if kv == "int8":
            q, s = cls.quantize_int8(x)
            return q.float() * s.unsqueeze(-1)
        return x

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv == "f32":
            return super().update(layer, k, v)
        t = k.shape[2]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.max_len}")
        if self.kv == "f16":
            self.k[layer][:, :, self.pos : end] = k  # rounds to nearest even
            self.v[layer][:, :, self.pos : end] = v
            return self.k[layer][:, :, :end].float(), self.v[layer][:, :, :end].float()
        out = []
        for c, sc, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.quantize_int8(x.float())
            c[layer][:, :, self.pos : end] = q
            sc[layer][:, :, self.pos : end] = s
            out.append(c[layer][:, :, :end].float() * sc[layer][:, :, :end].unsqueeze(-1))
        return out[0], out[1]

    def nbytes(self) -> int:
        extra = sum(t.numel() * 4 for t in self.k_scale + self.v_scale) if self.kv == "int8" else 0
        return super().nbytes() + extra


def kv_bytes_per_token(cfg: ModelConfig, kv: str) -> int:
    """KV cache bytes per token of context (all layers, k and v)."""
    per = {"f32": 4, "f16": 2, "int8": 1}[kv]
    return 2 * cfg.n_layers * cfg.kv_heads * (cfg.head_dim * per + (4 if kv == "int8" else 0))


class KVPool:
    """``n`` key/value caches of ``ctx`` tokens each (batch 1), allocated once: the slots a
    server decodes in.  Memory is bounded at start-up by :attr:`nbytes`; a slot is handed out by
    :meth:`acquire` and rewound (not freed) by :meth:`release`."""

    def __init__(self, model, n: int, ctx: int) -> None:
        if n < 1 or ctx < 2:
            raise ValueError(f"a KV pool needs >= 1 slot of >= 2 tokens, got {n} x {ctx}")
        self.ctx = ctx
        self.caches: list[KVCache] = [model.new_cache(1, ctx) for _ in range(n)]
        self._free = list(range(n - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.caches)

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """A free slot's index (its cache rewound to position 0), or None when all are busy."""
        if not self._free:
            return None
        i = self._free.pop()
        self.caches[i].pos = 0
        return i

    def release(self, i: int) -> None:
        if i in self._free:
            raise ValueError(f"KV slot {i} released twice")
        self.caches[i].pos = 0
        self._free.append(i)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def tokens_used(self) -> int:
        busy = set(range(len(self.caches))) - set(self._free)
        return sum(self.caches[i].pos for i in busy)


# ---------------------------------------------------------------------------------------------
# Conversion from a trained model
# ---------------------------------------------------------------------------------------------


def _grouped(cfg: ModelConfig) -> bool:
    """Whether ``cfg`` uses any group option the fused decode step does not compute."""
    return (cfg.act_groups > 1 or cfg.norm_groups > 1
            or (cfg.weight_groups > 1 and cfg.weight_group_dim != "out"))


def _quantized(lin, allow_bias: bool = False, own_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from .layers import BitLinear

    if not isinstance(lin, BitLinear):
        raise ValueError(f"cannot pack {type(lin).__name__}: only BitLinear projections have ternary/binary weights "
                         "(an fp model must be trained with quant=b1.58/b1, or quantised with bitlm.ptq)")
    if getattr(lin, "act_granularity_eval", lin.act_granularity) != "token":
        raise ValueError("act_granularity_eval='tensor': the packed engine quantises activations per token "
                         "(both papers' inference); this model evaluates per tensor")
    if lin.act_nonneg:
        raise ValueError("act_nonneg=True: the packed engine runs symmetric activations")
    if (lin.act_bits, lin.act_quant) not in ((8, "absmax"), (4, "absmean")) or (lin.norm is not None and not own_norm):
        raise ValueError("the packed engine runs W1.58A8/W1A8 with per-token 8-bit activations and model-level norms")
    if lin.bias is not None and not allow_bias:
        raise ValueError("the packed engine supports biases only on q/k/v projections")
    return lin.quantized_weight()


def _k_groups(lin) -> int:
    """K-slices of a BitLinear's packed weight: its activation groups and input-column weight
    groups, each slice inside one of both (their least common multiple)."""
    gw = lin.weight_groups if lin.weight_group_dim == "in" else 1
    return math.lcm(lin.act_groups, gw)


def _scale_table(lin, s: torch.Tensor, kg: int) -> torch.Tensor:
    """(k_groups x row groups) scales of ``lin``'s quantised weight (``bitlm.packing.slice_scales``)."""
    return slice_scales(s, lin.weight_group_dim, kg).reshape(kg, -1)


def _pack_linear(lin, fmt: str, allow_bias: bool = False, own_norm: bool = False) -> PackedWeight:
    """One BitLinear → its PackedWeight: row-group scales, K-slices for column groups / act groups
    (``own_norm``: the layer's built-in norm is applied by the caller, ``PackedBitLinear``)."""
    t, s = _quantized(lin, allow_bias, own_norm)
    kg = _k_groups(lin)
    if kg == 1:
        return pack_weight(t, s, fmt, s.numel())
    table = _scale_table(lin, s, kg)
    return pack_weight(t, table.reshape(-1), fmt, table.shape[1], kg)


def _pack_fused(lins: list, fmt: str) -> PackedWeight:
    """gate and up (same input) as one weight: their rows stacked, their row groups side by side."""
    kgs = {_k_groups(lin) for lin in lins}
    if len(kgs) != 1:
        raise ValueError(f"gate and up projections are grouped differently along K ({sorted(kgs)})")
    kg = kgs.pop()
    ts, tables = [], []
    for lin in lins:
        t, s = _quantized(lin)
        ts.append(t)
        tables.append(_scale_table(lin, s, kg))
    table = torch.cat(tables, dim=1)  # (kg, gate row groups + up row groups)
    return pack_weight(torch.cat(ts), table.reshape(-1), fmt, table.shape[1], kg)


def expected_k_groups(cfg: ModelConfig, row_parallel: bool) -> int:
    """The K-slices ``convert`` packs a projection of ``cfg`` with (q/k/v/gate/up, or o/down)."""
    dim = cfg.weight_group_dim
    if dim == "parallel":
        dim = "in" if row_parallel else "out"
    return math.lcm(act_groups(cfg, row_parallel), cfg.weight_groups if dim == "in" else 1)


def _fmt_for(cfg: ModelConfig, format: str | None) -> str:
    if cfg.quant == "fp":
        raise ValueError("model quant is 'fp': nothing to pack (train with quant=b1.58 or b1)")
    if format is None:
        return "i2" if cfg.quant == "b1.58" else "b1"
    f = get_format(format)
    if cfg.quant == "b1.58" and not f.ternary:
        raise ValueError(f"format {format!r} cannot hold ternary weights; use i2 or t1")
    if f.native_id is None:
        raise ValueError(f"format {format!r} has no native kernel; the engine packs i2, t1 or b1")
    return f.name


#: PackedLayer's norm fields → the BitNetModel block's norm modules (also their parameter names)
_NORM_SITES = dict(input_norm="input_layernorm", attn_sub_norm="self_attn.attn_sub_norm",
                   post_norm="post_attention_layernorm", ffn_sub_norm="mlp.ffn_sub_norm")


def convert(model, format: str | None = None, head: str = "f32", embed: str | None = None,
            progress: bool = False) -> PackedModel:
    """``bitlm.pack(model)``: a trained ``BitNetModel`` → ``PackedModel`` (weights quantised with
    the same functions training used, so the packed model computes the same ternary layer).
    ``progress``: report per layer (``bitlm pack``; a 2B4T-sized model takes about a minute)."""
    from .data.common import progress as progress_bar

    cfg = model.config
    fmt = _fmt_for(cfg, format)
    if any(hasattr(m, "lora_A") for m in model.modules()):  # a LoRA run: W + ΔW is not ternary
        from .lora import refuse_adapters

        refuse_adapters(model, "a packed .bitlm file")
    if blockers := inference_blockers(cfg):
        raise ValueError(f"cannot pack this model: {blockers[0]}")
    if cfg.act_variant != "a8" and _grouped(cfg):
        raise ValueError(f"cannot pack this model: act_variant={cfg.act_variant!r} with group quantisation / "
                         "normalisation (norm_groups, input-column weight groups): the packed engine "
                         "runs the 4-bit / Hadamard activations ungrouped only")
    embed = _dense_kinds(head, embed)
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    layers = []
    for blk in progress_bar(model.model.layers, enabled=progress, desc="pack", unit="layer"):
        att, mlp = blk.self_attn, blk.mlp
        packed = {}
        for name in ("q", "k", "v", "o"):
            lin = getattr(att, f"{name}_proj")
            packed[name] = _pack_linear(lin, fmt, allow_bias=name != "o")
            if lin.bias is not None:
                packed[f"{name}_b"] = f32(lin.bias)
        if cfg.gated_ffn:
            # G weight groups of gate rows then G of up rows: 2G groups over the fused rows
            packed["up"] = _pack_fused([mlp.gate_proj, mlp.up_proj], fmt)
        else:
            packed["up"] = _pack_linear(mlp.up_proj, fmt)
        packed["down"] = _pack_linear(mlp.down_proj, fmt)
        norms = {k: blk.get_submodule(v) for k, v in _NORM_SITES.items()}
        nt = {k: f32(v.weight) if hasattr(v, "weight") else None for k, v in norms.items()}  # Identity: None
        if cfg.arch == "bitnet":
            nt.update({f"{k}_b": f32(v.bias) if hasattr(v, "bias") else None for k, v in norms.items()})
        layers.append(PackedLayer(**packed, **nt))
    emb_w = model.model.embed_tokens.weight
    embed_d = Dense.from_float(embed, emb_w)
    head_d = embed_d if cfg.tie_embeddings and embed == head else Dense.from_float(head, model.lm_head.weight)
    fn = model.model.norm
    pm = PackedModel(cfg, layers, embed_d, head_d, f32(fn.weight),
                     f32(fn.bias) if getattr(fn, "bias", None) is not None else None, fmt)
    return pm.to_hugepages()


def _dense_kinds(head: str, embed: str | None) -> str:
    """Check the head / embedding storage options; returns the embedding's (default: as the head,
    int8 beside an int6 / int4 head)."""
    if head not in HEAD_TYPES:
        raise ValueError(f"--head {head}: the output head type must be one of {HEAD_TYPES}")
    if embed is not None and embed not in DENSE_TYPES:
        raise ValueError(f"--embed {embed}: the embedding must be one of {DENSE_TYPES} (rows are read one token "
                         "at a time; int6 / int4 are output-head formats)")
    return embed or (head if head in DENSE_TYPES else "int8")


def convert_gguf(path: str | Path, format: str | None = None, head: str = "f32", embed: str | None = None,
                 progress: bool = False, activation: str | None = None) -> PackedModel:
    """A one-scale ternary GGUF (llama.cpp's TQ1_0 / TQ2_0, bitnet.cpp's I2_S, ik_llama.cpp's
    IQ1_BN / IQ2_BN / IQ2_BN_R4, or float s·T) → ``PackedModel``, one tensor at a time: the same
    model as ``convert(bitlm.load(path))`` (tested byte for byte) without the float32 torch model
    in between (a 2B4T file: ~12 GB of memory that way, the float embedding and one layer this
    way).  Grouped or non-ternary files raise ``GGUFFormatError`` (``bitlm.load`` reads those)."""
    from .data.common import progress as progress_bar
    from .io.gguf import TernaryReader

    embed = _dense_kinds(head, embed)
    with TernaryReader(path, activation) as r:
        cfg = r.config
        fmt = _fmt_for(cfg, format)
        if blockers := inference_blockers(cfg):
            raise ValueError(f"cannot pack this model: {blockers[0]}")

        def one(name: str) -> PackedWeight:
            t, s = r.ternary(name)
            return pack_weight(t, torch.tensor([s], dtype=torch.float32), fmt, 1)

        layers = []
        for i in progress_bar(range(cfg.n_layers), enabled=progress, desc="pack", unit="layer"):
            p = f"model.layers.{i}"
            packed = {n: one(f"{p}.self_attn.{n}_proj.weight") for n in ("q", "k", "v", "o")}
            if cfg.gated_ffn:  # gate rows then up rows, one scale each (as _pack_fused)
                (tg, sg), (tu, su) = r.ternary(f"{p}.mlp.gate_proj.weight"), r.ternary(f"{p}.mlp.up_proj.weight")
                packed["up"] = pack_weight(torch.cat([tg, tu]), torch.tensor([sg, su], dtype=torch.float32), fmt, 2)
                del tg, tu
            else:
                packed["up"] = one(f"{p}.mlp.up_proj.weight")
            packed["down"] = one(f"{p}.mlp.down_proj.weight")
            nt = {k: r.floats(f"{p}.{v}.weight").contiguous() for k, v in _NORM_SITES.items()}
            layers.append(PackedLayer(**packed, **nt))
        shape = (cfg.vocab_size, cfg.d_model)
        emb = functools.partial(r.float_rows, "model.embed_tokens.weight")
        embed_d = Dense.from_float_rows(embed, emb, shape)
        if cfg.tie_embeddings and embed == head:
            head_d = embed_d
        else:
            head_d = Dense.from_float_rows(head, emb if cfg.tie_embeddings else
                                           functools.partial(r.float_rows, "lm_head.weight"), shape)
        final = r.floats("model.norm.weight").contiguous()
    return PackedModel(cfg, layers, embed_d, head_d, final, None, fmt).to_hugepages()


def pack(obj, format: str | None = None, **kwargs: Any):
    """``bitlm.pack``: a trained model → :class:`PackedModel` (see :func:`convert`); a float
    weight tensor → :class:`~bitlm.packing.PackedWeight` (``bitlm.packing.quantize_and_pack``)."""
    if isinstance(obj, torch.Tensor):
        from .packing import quantize_and_pack

        return quantize_and_pack(obj, format or "i2", **kwargs)
    return convert(obj, format, **kwargs)


# ---------------------------------------------------------------------------------------------
# The packed file (format: bitlm.io.packed)
# ---------------------------------------------------------------------------------------------

def _tensor_table(pm: PackedModel) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    tensors: dict[str, torch.Tensor] = {}
    packs: dict[str, dict[str, Any]] = {}
    for i, L in enumerate(pm.layers):
        for name in ("q", "k", "v", "o", "up", "down"):
            w: PackedWeight = getattr(L, name)
            key = f"layers.{i}.{name}"
            tensors[f"{key}.data"] = w.data
            tensors[f"{key}.scale"] = w.scale
            packs[key] = {"format": w.format, "version": w.version, "N": w.N, "K": w.K, "groups": w.groups}
            if w.k_groups > 1:  # absent in files of ungrouped models (and in every file before groups)
                packs[key]["k_groups"] = w.k_groups
        for name in ("input_norm", "attn_sub_norm", "post_norm", "ffn_sub_norm", "q_b", "k_b", "v_b"):
            for suffix in ("", "_b") if name.endswith("norm") else ("",):
                t = getattr(L, name + suffix)
                if t is not None:
                    tensors[f"layers.{i}.{name}{suffix}"] = t
    tensors.update(pm.embed.tensors("embed"))
    if pm.head is not pm.embed:
        tensors.update(pm.head.tensors("head"))
    tensors["final_norm"] = pm.final_norm
    if pm.final_norm_b is not None:
        tensors["final_norm_b"] = pm.final_norm_b
    return tensors, packs


def save_packed(pm: PackedModel, path: str | Path, tokenizer=None) -> Path:
    """Write ``pm`` as a packed file (``bitlm.io.packed``), atomically."""
    tensors, packs = _tensor_table(pm)
    tok_json = None
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend", tokenizer)
        tok_json = backend.to_str()
    elif pm.tokenizer_json is not None:
        tok_json = pm.tokenizer_json
    meta = {"model": pm.config.to_dict(), "format": pm.format, "embed": pm.embed.kind, "head": pm.head.kind,
            "tied_head": pm.head is pm.embed, "packs": packs}
    if pm.head.bits is not None:
        from .packing import HEAD_GROUP

        meta["head_group"] = HEAD_GROUP
    return write_packed(path, meta, tensors, tokenizer=tok_json)


def load_packed(path: str | Path, verify: bool = True) -> PackedModel:
    """A packed file as a ``PackedModel``: its tensors are views of the file's bytes, read into a
    huge-page buffer or memory-mapped (``bitlm.io.packed.read_packed``)."""
    path = Path(path)
    cfg = None

    def config_of(header: dict[str, Any]) -> None:
        nonlocal cfg
        try:
            cfg = ModelConfig.from_dict(header["model"], source=str(path))
        except (TypeError, ValueError, KeyError) as e:
            raise PackedFormatError(f"{path}: bad model config in header: {e}") from None

    header, tensors, mm = read_packed(path, verify, check_header=config_of)
    pm = _from_tensors(path, cfg, header, tensors)
    pm._mmap = mm
    return pm


def _from_tensors(path: Path, cfg: ModelConfig, header: dict, tensors: dict[str, torch.Tensor]) -> PackedModel:
    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise PackedFormatError(f"{path}: missing tensor {name!r}")
        return tensors[name]

    def packed(key: str, n: int, k: int, row_parallel: bool = False) -> PackedWeight:
        meta = header["packs"].get(key)
        if meta is None:
            raise PackedFormatError(f"{path}: missing packed weight {key!r}")
        if (meta["N"], meta["K"]) != (n, k):
            raise PackedFormatError(f"{path}: tensor {key!r} has shape ({meta['N']}, {meta['K']}), config expects ({n}, {k})")
        kg = meta.get("k_groups", 1)
        if kg != expected_k_groups(cfg, row_parallel):
            raise PackedFormatError(f"{path}: tensor {key!r} has k_groups={kg}, the config's group options expect "
                                    f"{expected_k_groups(cfg, row_parallel)}")
        try:
            return PackedWeight(meta["format"], meta["version"], n, k, get(f"{key}.data"), get(f"{key}.scale"),
                                meta["groups"], kg)
        except ValueError as e:
            raise PackedFormatError(f"{path}: tensor {key!r}: {e}") from None

    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    n_up = 2 * f if cfg.gated_ffn else f
    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        kw: dict[str, Any] = dict(
            q=packed(f"{p}.q", cfg.n_heads * hd, d), k=packed(f"{p}.k", cfg.kv_heads * hd, d),
            v=packed(f"{p}.v", cfg.kv_heads * hd, d), o=packed(f"{p}.o", d, cfg.n_heads * hd, True),
            up=packed(f"{p}.up", n_up, d), down=packed(f"{p}.down", d, f, True),
        )
        for name, width in (("input_norm", d), ("attn_sub_norm", cfg.n_heads * hd), ("post_norm", d), ("ffn_sub_norm", f)):
            if name.endswith("sub_norm") and not cfg.sub_norm:
                continue
            t = get(f"{p}.{name}")
            if tuple(t.shape) != (width,):
                raise PackedFormatError(f"{path}: tensor '{p}.{name}' has shape {tuple(t.shape)}, expected ({width},)")
            kw[name] = t
            if cfg.arch == "bitnet":
                kw[f"{name}_b"] = get(f"{p}.{name}_b")
        if cfg.qkv_bias:
            kw.update(q_b=get(f"{p}.q_b"), k_b=get(f"{p}.k_b"), v_b=get(f"{p}.v_b"))
        kw.setdefault("attn_sub_norm", None)
        kw.setdefault("ffn_sub_norm", None)
        layers.append(PackedLayer(**kw))

    def dense(prefix: str, kind: str) -> Dense:
        if kind not in HEAD_TYPES or (prefix == "embed" and kind not in DENSE_TYPES):
            raise PackedFormatError(f"{path}: unknown {prefix} type {kind!r} (this bitlm reads {HEAD_TYPES})")
        w = get(f"{prefix}.weight")
        if kind in LOWBIT_HEADS:
            from .packing import HEAD_GROUP, head_nbytes

            if header.get("head_group") != HEAD_GROUP:
                raise PackedFormatError(f"{path}: {kind} head with group size {header.get('head_group')!r}, "
                                        f"this bitlm reads groups of {HEAD_GROUP}")
            nbytes, nscale = head_nbytes(LOWBIT_HEADS[kind], cfg.vocab_size, d)
            sc = get(f"{prefix}.scale")
            if w.dtype != torch.uint8 or w.numel() != nbytes or sc.dtype != torch.float16 or sc.numel() != nscale:
                raise PackedFormatError(f"{path}: tensor '{prefix}.weight' / '{prefix}.scale' do not hold a "
                                        f"{cfg.vocab_size}x{d} {kind} head")
            return Dense(kind, w, sc, (cfg.vocab_size, d))
        if tuple(w.shape) != (cfg.vocab_size, d):
            raise PackedFormatError(f"{path}: tensor '{prefix}.weight' has shape {tuple(w.shape)}, expected {(cfg.vocab_size, d)}")
        return Dense(kind, w, tensors.get(f"{prefix}.scale"))

    embed = dense("embed", header["embed"])
    head = embed if header.get("tied_head") else dense("head", header["head"])
    return PackedModel(cfg, layers, embed, head, get("final_norm"), tensors.get("final_norm_b"), header["format"],
                       header.get("tokenizer"))


# ---------------------------------------------------------------------------------------------
# CLI: bitlm pack
# ---------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a trained b1.58 / b1 model (checkpoint, HF folder, GGUF)")
    p.add_argument("--out", required=True, help="packed model file to write (e.g. model.bitlm)")
    p.add_argument("--format", default=None, choices=["i2", "t1", "b1"],
                   help="i2 (ternary 2 bpw), t1 (ternary 1.6 bpw) or b1 (binary); default i2 / b1")
    p.add_argument("--head", default="f32", metavar="{" + ",".join(HEAD_TYPES) + "}",
                   help="output head storage: bf16 / int8 halve or quarter the largest read of big-vocabulary "
                        "models; int6 / int4 (one f16 scale per 32 columns, read with int8 activations) cut it "
                        "to 6.5 / 4.5 bits per weight")
    p.add_argument("--embed", default=None, metavar="{" + ",".join(DENSE_TYPES) + "}",
                   help="embedding storage (default: as --head; int8 with an int6 / int4 head)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to embed (default: the model's own, if any)")
    p.add_argument("--merge-lora", action="store_true",
                   help="a LoRA run: fold its adapters into the ternary weights first (lossy; the loss is reported)")


def run(args) -> int:
    from .loading import detect_format, load, load_tokenizer_for

    if args.head not in HEAD_TYPES:  # checked before the model loads
        raise ValueError(f"--head {args.head}: the output head type must be one of {HEAD_TYPES}")
    if args.embed is not None and args.embed not in DENSE_TYPES:
        raise ValueError(f"--embed {args.embed}: the embedding must be one of {DENSE_TYPES} (int6 / int4 are "
                         "output-head formats)")
    source = detect_format(args.model)
    if source == "packed":
        raise ValueError(f"{args.model}: a packed model cannot be packed again; pass the checkpoint, "
                         "HF folder or GGUF it was packed from")
    pm = None
    if source == "gguf" and not args.merge_lora:  # tensor by tensor, no float model
        from .io.gguf import GroupedGGUF

        try:
            pm = convert_gguf(args.model, args.format, args.head, args.embed, progress=True)
        except GroupedGGUF:
            pass  # group-wise scales: through the torch model below
    if pm is None:
        model = load(args.model)
        if args.merge_lora:
            from .lora import merge_for_export

            print(f"bitlm pack: {merge_for_export(model)}")
        pm = convert(model, args.format, args.head, args.embed, progress=True)
        del model
    try:
        tok = load_tokenizer_for(args.model, args.tokenizer)
    except FileNotFoundError:
        tok = None
    out = save_packed(pm, args.out, tokenizer=tok)
    b = pm.weight_bytes()
    n_lin = sum(w.N * w.K for L in pm.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
    print(f"packed {args.model} -> {out} ({out.stat().st_size / 1e6:.2f} MB): format {pm.format}, "
          f"{8 * b['linear'] / n_lin:.3f} bits per linear weight, head {pm.head.kind}, embedding {pm.embed.kind}")
    return 0
