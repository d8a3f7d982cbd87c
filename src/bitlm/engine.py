"""The packed inference engine: ``PackedBitLinear``, packed models for the three architectures,
and the memory-mapped packed model file (``bitlm pack``).

A packed model computes what the torch reference ``BitNetModel`` computes, with the weights as
``PackedWeight`` (i2 / t1 ternary, b1 binary; ``bitlm.packing``) and every projection an exact
integer matmul in the native kernels (``bitlm.kernels``): int8 per-token activations from the
fused RMSNorm + absmax quantiser, int32 accumulation, one float epilogue.  Norms, RoPE, attention
and the residual stream stay float32; the embedding and output head are kept in f32, bf16 or
int8 (per-row absmax scale) by option — for 2B4T the head is the largest read per token.

The packed file (``.bitlm``) format is ``bitlm.io.packed``'s; this module maps a
``PackedModel`` to and from its header and named tensors (``save_packed`` / ``load_packed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import kernels
from .config import ModelConfig
from .io.packed import MAGIC, VERSION, PackedFormatError, read_header, read_packed, write_packed
from .model import KVCache, inference_blockers, rope_cos_sin
from .packing import PackedWeight, get_format, pack_weight

__all__ = ["PackedBitLinear", "PackedModel", "KVPool", "convert", "pack", "save_packed", "load_packed", "PackedFormatError",
           "read_header", "MAGIC", "VERSION", "add_arguments", "run"]

DENSE_TYPES = ("f32", "bf16", "int8")


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
        if lin.act_nonneg or (lin.weight_groups > 1 and lin.weight_group_dim != "out"):
            raise ValueError("PackedBitLinear packs symmetric activations and output-row weight groups only "
                             f"(act_nonneg={lin.act_nonneg}, weight_group_dim={lin.weight_group_dim!r})")
        t, s = lin.quantized_weight()
        return cls(pack_weight(t, s, format, lin.weight_groups), None, lin.norm_eps, lin.norm == "rmsnorm")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.w, None, self.norm_weight, self.eps, rmsnorm=self.rmsnorm or None)


class Dense:
    """A high-precision matrix (embedding table / output head) stored as f32, bf16 or int8 rows."""

    def __init__(self, kind: str, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        if kind not in DENSE_TYPES:
            raise ValueError(f"dense type must be one of {DENSE_TYPES}, got {kind!r}")
        self.kind, self.weight, self.scale = kind, weight, scale  # scale: (V,) float32 for int8

    @classmethod
    def from_float(cls, kind: str, w: torch.Tensor) -> Dense:
        w = w.detach().float()
        if kind == "f32":
            return cls(kind, w.contiguous())
        if kind == "bf16":
            return cls(kind, w.to(torch.bfloat16).contiguous())
        # int8 per row: the same absmax rule as activations (bitlm.quant)
        from .quant import activation_quantize

        q, a = activation_quantize(w)
        return cls(kind, q.to(torch.int8).contiguous(), (1.0 / a.reshape(-1)).contiguous())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup → float32 (..., d)."""
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
        return kernels.dense_int8_matmul(x, self.weight, self.scale)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        d = {f"{prefix}.weight": self.weight}
        if self.scale is not None:
            d[f"{prefix}.scale"] = self.scale
        return d

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + (self.scale.numel() * 4 if self.scale is not None else 0)


#: Prefill runs the FFN in blocks of this many rows (its 2 x ffn_dim wide intermediates are the
#: largest temporaries; 64 and 128 measured the same speed).
FFN_ROW_BLOCK = 128


def _rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``bitlm.model.apply_rope`` in place on a fresh float32 tensor: x·cos + rotate_half(x)·sin,
    the same operations in the same order (same bits), without two extra (B, H, T, D) copies."""
    x1, x2 = x.chunk(2, dim=-1)
    r = torch.cat([-x2, x1], dim=-1).mul_(sin)
    return x.mul_(cos).add_(r)


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

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len, dtype=torch.float32)

    def weight_bytes(self) -> dict[str, int]:
        lin = sum(w.nbytes for L in self.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
        tied = self.config.tie_embeddings
        return {"linear": lin, "embedding": self.embed.nbytes, "head": 0 if tied else self.head.nbytes}

    # -- forward ---------------------------------------------------------------------------------
    def _norm_quant(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
        """The norm before a BitLinear, fused with int8 quantisation (RMSNorm) or in torch (LN)."""
        if w is None:  # no norm at this site (sub_norm=False)
            return kernels.quantize_rows(x)
        if self.config.arch == "bitnet":
            h = F.layer_norm(x, (x.shape[-1],), w, b, self.config.norm_eps)
            return kernels.quantize_rows(h)
        return kernels.quantize_rows(x, w, self.config.norm_eps)

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
        x = self.embed.rows(input_ids).reshape(B * T, cfg.d_model)  # (B*T, d) float32, a fresh tensor
        H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        # Peak memory is a prefill's: temporaries are dropped as soon as they are dead, RoPE and
        # the gating run in place on fresh tensors, and long inputs run the FFN (whose 2 x ffn_dim
        # wide intermediates dominate) in row blocks — rows are independent there.  Measured on
        # the 2B4T shape, 512 tokens: 90 -> 20 MiB of temporaries, same bits.
        for i, L in enumerate(self.layers):
            xq, a = self._norm_quant(x, L.input_norm, L.input_norm_b)
            q = kernels.matmul(xq, a, L.q, L.q_b).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
            k = kernels.matmul(xq, a, L.k, L.k_b).view(B, T, Hkv, D).transpose(1, 2)
            v = kernels.matmul(xq, a, L.v, L.v_b).view(B, T, Hkv, D).transpose(1, 2)
            del xq, a
            q, k = _rope_(q, cos, sin), _rope_(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, k, v)
            att = _attend(q, k, v, past).transpose(1, 2).reshape(B * T, H * D)  # (B*T, H*D)
            del q, k, v
            aq, aa = self._norm_quant(att, L.attn_sub_norm, L.attn_sub_norm_b)
            del att
            x = x + kernels.matmul(aq, aa, L.o)  # a fresh tensor: the FFN below may add in place
            del aq, aa
            if x.shape[0] > FFN_ROW_BLOCK:
                for r in range(0, x.shape[0], FFN_ROW_BLOCK):
                    xs = x[r : r + FFN_ROW_BLOCK]
                    xs += self._ffn(L, xs)
            else:
                x = x + self._ffn(L, x)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x, T = x.view(B, T, -1)[:, -1], 1
        return self._final(x, B, T)

    def _ffn(self, L: PackedLayer, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sub-layer of (M, d) rows (without the residual add)."""
        cfg = self.config
        hq, ha = self._norm_quant(x, L.post_norm, L.post_norm_b)
        u = kernels.matmul(hq, ha, L.up)
        del hq, ha
        if cfg.arch == "bitnet":
            m = F.gelu(u)
        else:
            g, u = u.chunk(2, dim=-1)  # gate rows first, then up (see convert())
            m = F.silu(g) if cfg.arch == "bitnet-b1.58" else F.relu(g).square_()
            m.mul_(u)  # act(g) * u, in place on the fresh act(g)
            del g
        del u
        mq, ma = self._norm_quant(m, L.ffn_sub_norm, L.ffn_sub_norm_b)
        del m
        return kernels.matmul(mq, ma, L.down)

    #: Activations of the output head: "f32" (the normed hidden state as is) or "int8" — quantised
    #: per token like every BitLinear input, then an exact int8 x int8 product (W8A8, as llama.cpp
    #: reads a q8_0 head); needs an int8 head, and decode reads it at memory speed.
    HEAD_ACTS = ("f32", "int8")
    _head_act = "f32"

    @property
    def head_act(self) -> str:
        return self._head_act

    @head_act.setter
    def head_act(self, mode: str) -> None:
        if mode not in self.HEAD_ACTS:
            raise ValueError(f"head_act must be one of {self.HEAD_ACTS}, got {mode!r}")
        if mode == "int8" and self.head.kind != "int8":
            raise ValueError(f"head_act='int8' needs an int8 output head, this model's is {self.head.kind} "
                             "(pack it with --head int8)")
        self._head_act = mode

    def _final(self, x: torch.Tensor, B: int, T: int, rowwise: bool = False) -> torch.Tensor:
        """Final norm + output head: (B*T, d) → logits (B, T, V); ``rowwise`` see ``Dense.matmul``."""
        cfg = self.config
        if self._head_act == "int8":  # fused RMSNorm + quantiser (LayerNorm in torch), W8A8 head
            if cfg.arch == "bitnet":
                xq, a = kernels.quantize_rows(F.layer_norm(x, (cfg.d_model,), self.final_norm, self.final_norm_b,
                                                           cfg.norm_eps))
            else:
                xq, a = kernels.quantize_rows(x, self.final_norm, cfg.norm_eps)
            return kernels.dense_int8a8_matmul(xq, a, self.head.weight, self.head.scale).view(B, T, -1)
        if cfg.arch == "bitnet":
            h = F.layer_norm(x, (cfg.d_model,), self.final_norm, self.final_norm_b, cfg.norm_eps)
        else:
            xf = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
            h = self.final_norm * xf
        return self.head.matmul(h, rowwise).view(B, T, -1)

    # -- batched decode (serving) ----------------------------------------------------------------
    @torch.inference_mode()
    def decode_batch(self, input_ids: torch.Tensor | list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of N independent sequences: token ``input_ids[i]`` at position
        ``caches[i].pos`` of sequence i, each with its own (batch-1) cache → logits (N, V).

        Every projection runs once for all N rows (the kernels' GEMM with M = N: the weights are
        read once per step); attention runs per sequence over its own cache.  Activations are
        quantised per token and the integer products are exact, so row i's logits are the same
        bits whatever else is in the batch — and the same bits as the per-op single-sequence
        path (``forward`` with ``fused_decode = False``)."""
        cfg = self.config
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
        N = ids.numel()
        if N != len(caches) or N == 0:
            raise ValueError(f"decode_batch: {N} tokens for {len(caches)} caches")
        pos = [c.pos for c in caches]
        for p_, c in zip(pos, caches):
            if p_ + 1 > cfg.max_seq_len:
                raise ValueError(f"sequence of {p_ + 1} tokens exceeds max_seq_len={cfg.max_seq_len}")
            if p_ + 1 > c.max_len:
                raise ValueError(f"KV cache overflow: {p_ + 1} tokens > capacity {c.max_len}")
        cos, sin = rope_cos_sin(torch.tensor(pos), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # (N, D)
        cos, sin = cos[:, None], sin[:, None]  # (N, 1, D): one position per row, broadcast over heads
        x = self.embed.rows(ids).reshape(N, cfg.d_model)
        H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        for i, L in enumerate(self.layers):
            xq, a = self._norm_quant(x, L.input_norm, L.input_norm_b)
            q = _rope_(kernels.matmul(xq, a, L.q, L.q_b).view(N, H, D), cos, sin)
            k = _rope_(kernels.matmul(xq, a, L.k, L.k_b).view(N, Hkv, D), cos, sin)
            v = kernels.matmul(xq, a, L.v, L.v_b).view(N, Hkv, D)
            del xq, a
            att = torch.empty(N, H * D)
            for j, c in enumerate(caches):  # (1, H, 1, D) queries over this sequence's own keys
                kc, vc = c.update(i, k[j].view(1, Hkv, 1, D), v[j].view(1, Hkv, 1, D))
                att[j] = _attend(q[j].view(1, H, 1, D), kc, vc, pos[j]).reshape(H * D)
            del q, k, v
            aq, aa = self._norm_quant(att, L.attn_sub_norm, L.attn_sub_norm_b)
            del att
            x = x + kernels.matmul(aq, aa, L.o)
            del aq, aa
            x = x + self._ffn(L, x)
        for c in caches:
            c.advance(1)
        return self._final(x, N, 1, rowwise=True).view(N, -1)

    # -- fused native decode ---------------------------------------------------------------------
    #: Decode one token per native call (``bitlm_decode_step``) when the native kernels are in
    #: use; False (or env BITLM_FUSED_DECODE=0) runs the per-op path above, its reference twin.
    fused_decode = True

    def _fused_decode_ok(self) -> bool:
        if not self.fused_decode or os.environ.get("BITLM_FUSED_DECODE", "1") == "0":
            return False
        if self.config.arch == "bitnet":  # LayerNorm + GELU, non-gated FFN: per-op path
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
        from .kernels import native

        key = getattr(cache, "_bitlm_decoder", None)
        if key is not None and key[0] is self:
            return key[1]
        cfg = self.config
        blocks = []
        for i, L in enumerate(self.layers):
            blocks.append(dict(q=L.q, k=L.k, v=L.v, o=L.o, up=L.up, down=L.down, q_b=L.q_b, k_b=L.k_b, v_b=L.v_b,
                               input_norm=L.input_norm, attn_sub_norm=L.attn_sub_norm, post_norm=L.post_norm,
                               ffn_sub_norm=L.ffn_sub_norm, k_cache=cache.k[i], v_cache=cache.v[i]))
        dec = native.Decoder(d_model=cfg.d_model, n_heads=cfg.n_heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                             ffn_dim=cfg.ffn_dim, max_len=cache.max_len,
                             act="silu" if cfg.arch == "bitnet-b1.58" else "relu2", eps=cfg.norm_eps, blocks=blocks)
        cache._bitlm_decoder = (self, dec)
        return dec

    def _rope_rows(self, pos: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE factors of position ``pos`` from a table of the first ``n`` positions, built once
        per model (and again only for a longer cache): computing them per token took ~80 us of
        Python and torch dispatch.  ``rope_cos_sin`` gives a position the same bits alone or in a
        batch (elementwise ops; tests/test_fused_decode.py checks every row)."""
        cfg = self.config
        if pos >= n:  # past the cache: the step refuses it with the usual error
            return rope_cos_sin(torch.tensor([pos]), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        tab = self.__dict__.get("_rope_table")
        if tab is None or tab[0].shape[0] < n:
            tab = self._rope_table = rope_cos_sin(torch.arange(n), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return tab[0][pos], tab[1][pos]

    def _decode_fused(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cfg = self.config
        pos = cache.pos
        dec = self._decoder(cache)
        x = self.embed.rows(input_ids.reshape(1)).reshape(cfg.d_model).contiguous()  # a fresh copy
        cos, sin = self._rope_rows(pos, cache.max_len)
        dec.step(x, pos, cos, sin)
        cache.advance(1)
        return self._final(x.view(1, cfg.d_model), 1, 1)


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


def _quantized(lin, allow_bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from .layers import BitLinear

    if not isinstance(lin, BitLinear):
        raise ValueError(f"cannot pack {type(lin).__name__}: only BitLinear projections have ternary/binary weights "
                         "(an fp model must be trained with quant=b1.58/b1, or quantised with bitlm.ptq)")
    if getattr(lin, "act_granularity_eval", lin.act_granularity) != "token":
        raise ValueError("act_granularity_eval='tensor': the packed engine quantises activations per token "
                         "(both papers' inference); this model evaluates per tensor")
    if lin.act_nonneg or (lin.weight_groups > 1 and lin.weight_group_dim != "out"):
        raise ValueError(f"act_nonneg={lin.act_nonneg}, weight_group_dim={lin.weight_group_dim!r}: the packed engine "
                         "runs symmetric activations and output-row weight groups only")
    if lin.act_bits != 8 or lin.act_groups != 1 or lin.norm is not None:
        raise ValueError("the packed engine runs W1.58A8/W1A8 with per-token 8-bit activations and model-level norms")
    if lin.bias is not None and not allow_bias:
        raise ValueError("the packed engine supports biases only on q/k/v projections")
    return lin.quantized_weight()


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


def convert(model, format: str | None = None, head: str = "f32", embed: str | None = None) -> PackedModel:
    """``bitlm.pack(model)``: a trained ``BitNetModel`` → ``PackedModel`` (weights quantised with
    the same functions training used, so the packed model computes the same ternary layer)."""
    cfg = model.config
    fmt = _fmt_for(cfg, format)
    if blockers := inference_blockers(cfg):
        raise ValueError(f"cannot pack this model: {blockers[0]}")
    embed = embed or head
    f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    layers = []
    for blk in model.model.layers:
        att, mlp = blk.self_attn, blk.mlp
        packed = {}
        for name in ("q", "k", "v", "o"):
            lin = getattr(att, f"{name}_proj")
            t, s = _quantized(lin, allow_bias=name != "o")
            packed[name] = pack_weight(t, s, fmt)
            if lin.bias is not None:
                packed[f"{name}_b"] = f32(lin.bias)
        if cfg.gated_ffn:
            (tg, sg), (tu, su) = _quantized(mlp.gate_proj), _quantized(mlp.up_proj)
            # G weight groups of gate rows then G of up rows: 2G groups over the fused rows
            packed["up"] = pack_weight(torch.cat([tg, tu]), torch.cat([sg, su]), fmt, groups=sg.numel() + su.numel())
        else:
            t, s = _quantized(mlp.up_proj)
            packed["up"] = pack_weight(t, s, fmt)
        t, s = _quantized(mlp.down_proj)
        packed["down"] = pack_weight(t, s, fmt)
        norms = dict(input_norm=blk.input_layernorm, attn_sub_norm=att.attn_sub_norm,
                     post_norm=blk.post_attention_layernorm, ffn_sub_norm=mlp.ffn_sub_norm)
        nt = {k: f32(v.weight) if hasattr(v, "weight") else None for k, v in norms.items()}  # Identity: None
        if cfg.arch == "bitnet":
            nt.update({f"{k}_b": f32(v.bias) if hasattr(v, "bias") else None for k, v in norms.items()})
        layers.append(PackedLayer(**packed, **nt))
    emb_w = model.model.embed_tokens.weight
    embed_d = Dense.from_float(embed, emb_w)
    head_d = embed_d if cfg.tie_embeddings and embed == head else Dense.from_float(head, model.lm_head.weight)
    fn = model.model.norm
    return PackedModel(cfg, layers, embed_d, head_d, f32(fn.weight),
                       f32(fn.bias) if getattr(fn, "bias", None) is not None else None, fmt)


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
    return write_packed(path, meta, tensors, tokenizer=tok_json)


def load_packed(path: str | Path, verify: bool = True) -> PackedModel:
    """Memory-map a packed file into a ``PackedModel`` (weights are not copied)."""
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

    def packed(key: str, n: int, k: int) -> PackedWeight:
        meta = header["packs"].get(key)
        if meta is None:
            raise PackedFormatError(f"{path}: missing packed weight {key!r}")
        if (meta["N"], meta["K"]) != (n, k):
            raise PackedFormatError(f"{path}: tensor {key!r} has shape ({meta['N']}, {meta['K']}), config expects ({n}, {k})")
        try:
            return PackedWeight(meta["format"], meta["version"], n, k, get(f"{key}.data"), get(f"{key}.scale"), meta["groups"])
        except ValueError as e:
            raise PackedFormatError(f"{path}: tensor {key!r}: {e}") from None

    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    n_up = 2 * f if cfg.gated_ffn else f
    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        kw: dict[str, Any] = dict(
            q=packed(f"{p}.q", cfg.n_heads * hd, d), k=packed(f"{p}.k", cfg.kv_heads * hd, d),
            v=packed(f"{p}.v", cfg.kv_heads * hd, d), o=packed(f"{p}.o", d, cfg.n_heads * hd),
            up=packed(f"{p}.up", n_up, d), down=packed(f"{p}.down", d, f),
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
        w = get(f"{prefix}.weight")
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
    p.add_argument("--head", default="f32", choices=DENSE_TYPES, help="output head storage (bf16 or int8 halve or quarter the largest read of big-vocabulary models)")
    p.add_argument("--embed", default=None, choices=DENSE_TYPES, help="embedding storage (default: as --head)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to embed (default: the model's own, if any)")


def run(args) -> int:
    from .loading import detect_format, load, load_tokenizer_for

    if detect_format(args.model) == "packed":
        raise ValueError(f"{args.model}: a packed model cannot be packed again; pass the checkpoint, "
                         "HF folder or GGUF it was packed from")
    model = load(args.model)
    try:
        tok = load_tokenizer_for(args.model, args.tokenizer)
    except FileNotFoundError:
        tok = None
    pm = convert(model, args.format, args.head, args.embed)
    out = save_packed(pm, args.out, tokenizer=tok)
    b = pm.weight_bytes()
    n_lin = sum(w.N * w.K for L in pm.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
    print(f"packed {args.model} -> {out} ({out.stat().st_size / 1e6:.2f} MB): format {pm.format}, "
          f"{8 * b['linear'] / n_lin:.3f} bits per linear weight, head {pm.head.kind}, embedding {pm.embed.kind}")
    return 0
