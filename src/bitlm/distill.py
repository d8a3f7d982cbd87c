"""Knowledge distillation from a full-precision teacher (``bitlm train --teacher``).

The losses follow BitNet Distillation (BitDistill, arXiv 2510.13998 §3.3, Eq. 8-13; the released
code of microsoft/BitNet PR #382 where the paper is silent); see
``shared/reference/activations-distill.md`` §4.4.  The total loss of a micro-batch is

    L = L_CE + λ · L_LD + γ · L_AD

* ``L_CE``: the language-model loss (next-token cross-entropy), as without a teacher.
* ``L_LD`` (logit distillation, Eq. 8-9): KL(P_teacher ‖ P_student) between the two next-token
  distributions softened by the temperature τ, averaged over every position of the batch and
  multiplied by τ² (Hinton et al.; the released code does this, the paper's equation does not:
  with τ² the gradient's scale stays that of τ = 1 as τ grows).  ``--kd-weight`` λ (default 1,
  BitDistill's summarisation setting; it uses 10 for classification), ``--kd-temperature`` τ
  (default 5.0, the paper's).
* ``L_AD`` (multi-head attention-relation distillation, MiniLM-v2, Eq. 10-12), off unless
  ``--kd-attention-layer L`` names a layer (the paper recommends one late layer).  For each of
  Q, K, V of layer L (Q and K after RoPE, V the raw projection, K/V at their own GQA width, as
  the code does), the heads are concatenated and re-split into ``A_r`` relation heads
  (32 as in the code, or the largest divisor of 32 that divides every width), each vector is
  L2-normalised and the relation is R = softmax(A·Aᵀ) (the code's cosine relation at
  temperature 1; the paper writes A·Aᵀ/√d_r).  L_AD = Σ_{Q,K,V} mean over rows of
  KL(R_teacher ‖ R_student), divided by (#layers × A_r) as the code does, so its weight γ
  (``--kd-attention-weight``, default 1e3 = BitDistill's summarisation value; 1e5 for
  classification) is on the code's scale.  No causal mask on the T×T relation (the code has none).

The teacher is any model ``bitlm.load`` reads (a full-precision Hugging Face Llama-family folder
is loaded with ``quant="fp"``, not converted to ternary); it runs in eval mode under
``torch.no_grad``, optionally in bf16 (``--teacher-dtype``), with its parameters frozen, so
gradients reach only the student.  Its vocabulary must be the student's.  In a data-parallel run
every rank holds its own replica (the teacher is not wrapped: it has no gradients to reduce).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["kd_logit_loss", "attention_relation_loss", "relation_heads", "Distiller", "load_teacher"]

TEACHER_DTYPES = ("fp32", "bf16")
RELATION_HEADS = 32  # BitDistill code: split_head_number


def kd_logit_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · mean over positions of KL(softmax(t/τ) ‖ softmax(s/τ)) (nats), in float32.

    ``student_logits`` / ``teacher_logits``: (..., V) of the same shape."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # per position
    return kl.mean() * temperature**2


def relation_heads(widths: Sequence[int], wanted: int = RELATION_HEADS) -> int:
    """The number of relation heads: ``wanted``, or its largest divisor dividing every width."""
    return max(h for h in range(1, wanted + 1) if wanted % h == 0 and all(w % h == 0 for w in widths))


def _relations(a: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) → log R (B, heads, T, T): cosine relations of the re-split heads, log-softmaxed."""
    B, T, D = a.shape
    a = F.normalize(a.float().reshape(B, T, heads, D // heads).transpose(1, 2), dim=-1)
    return F.log_softmax(a @ a.transpose(-1, -2), dim=-1)


def attention_relation_loss(student: Sequence[Sequence[torch.Tensor]], teacher: Sequence[Sequence[torch.Tensor]],
                            heads: int) -> torch.Tensor:
    """L_AD over layers: ``student[i]`` / ``teacher[i]`` are the (Q, K, V) tensors (B, T, D_*) of
    the i-th distilled layer.  Σ over Q, K, V of the mean over rows (B·heads·T) of
    KL(R_teacher ‖ R_student), summed over layers, divided by (#layers × heads)."""
    total = None
    for s_qkv, t_qkv in zip(student, teacher, strict=True):
        for s, t in zip(s_qkv, t_qkv, strict=True):
            ls, lt = _relations(s, heads), _relations(t, heads)
            kl = (lt.exp() * (lt - ls)).sum(-1).mean()
            total = kl if total is None else total + kl
    assert total is not None
    return total / (len(student) * heads)


def load_teacher(path: str, dtype: str = "fp32", device: torch.device | str = "cpu") -> torch.nn.Module:
    """The teacher model at ``path``: eval mode, frozen, on ``device`` in ``dtype``."""
    from .loading import detect_format, load

    if dtype not in TEACHER_DTYPES:
        raise ValueError(f"--teacher-dtype {dtype!r}: choose one of {', '.join(TEACHER_DTYPES)}")
    fmt = detect_format(path)
    if fmt == "packed":
        raise ValueError(f"--teacher {path}: a packed file has no logits path for training; give the checkpoint, "
                         "HF folder or GGUF it came from")
    kw: dict[str, Any] = {}
    if fmt == "hf":
        from .convert import is_llama_family

        if is_llama_family(path):
            kw["quant"] = "fp"  # the full-precision teacher, not its ternary conversion
    teacher = load(path, **kw)
    teacher = teacher.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class _QKVCapture:
    """Forward hooks on q/k/v_proj of chosen layers: (Q, K, V) as (B, T, D), Q and K after RoPE."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]) -> None:
        self.cfg = model.config
        self.layers = list(layers)
        self.store: dict[tuple[int, str], torch.Tensor] = {}
        self.active = False
        self.handles = []
        blocks = model.model.layers
        for i in self.layers:
            attn = blocks[i].self_attn
            for name in ("q", "k", "v"):
                self.handles.append(getattr(attn, f"{name}_proj").register_forward_hook(self._hook(i, name)))

    def _hook(self, layer: int, name: str):
        def hook(_module, _inp, out):
            if self.active:
                self.store[(layer, name)] = out
        return hook

    def _roped(self, a: torch.Tensor, heads: int) -> torch.Tensor:
        """(B, T, heads·head_dim) with RoPE applied per head at positions 0..T-1, as Attention does."""
        from .model import apply_rope, rope_cos_sin

        cfg = self.cfg
        B, T, _ = a.shape
        cos, sin = rope_cos_sin(torch.arange(T, device=a.device), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        a = a.view(B, T, heads, cfg.head_dim).transpose(1, 2)
        return apply_rope(a, cos.to(a.dtype), sin.to(a.dtype)).transpose(1, 2).reshape(B, T, heads * cfg.head_dim)

    def take(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = []
        for i in self.layers:
            q, k, v = (self.store[(i, n)] for n in ("q", "k", "v"))
            out.append((self._roped(q, self.cfg.n_heads), self._roped(k, self.cfg.kv_heads), v))
        self.store.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _layer_index(layer: int, n_layers: int, who: str) -> int:
    i = layer + n_layers if layer < 0 else layer
    if not 0 <= i < n_layers:
        raise ValueError(f"--kd-attention-layer {layer}: the {who} has {n_layers} layers")
    return i


class Distiller:
    """The KD loss of a training run: ``loss(model, x, y, bf16, device_type)`` → (total, parts)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, *, weight: float, temperature: float,
                 attention_layers: Sequence[int] = (), attention_weight: float = 1e3, teacher_path: str = "") -> None:
        if not temperature > 0:
            raise ValueError(f"--kd-temperature must be > 0, got {temperature}")
        if not weight >= 0 or not attention_weight >= 0:
            raise ValueError(f"--kd-weight and --kd-attention-weight must be >= 0, got {weight}, {attention_weight}")
        tv, sv = teacher.config.vocab_size, student.config.vocab_size
        if tv != sv:
            raise ValueError(f"--teacher {teacher_path}: its vocabulary has {tv} tokens, the student's {sv}; "
                             "distillation needs the same tokenizer")
        self.teacher, self.weight, self.temperature = teacher, float(weight), float(temperature)
        self.attention_weight = float(attention_weight)
        self.teacher_dtype = next(teacher.parameters()).dtype
        self.s_cap = self.t_cap = None
        self.heads = 0
        if attention_layers:
            s_layers = [_layer_index(L, student.config.n_layers, "student") for L in attention_layers]
            t_layers = [_layer_index(L, teacher.config.n_layers, "teacher") for L in attention_layers]
            widths = [c.n_heads * c.head_dim for c in (student.config, teacher.config)] + \
                     [c.kv_heads * c.head_dim for c in (student.config, teacher.config)]
            self.heads = relation_heads(widths)
            self.s_cap, self.t_cap = _QKVCapture(student, s_layers), _QKVCapture(teacher, t_layers)

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor):
        if self.t_cap is not None:
            self.t_cap.active = True
        try:
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.teacher_dtype == torch.bfloat16):
                logits = self.teacher(x)
            return logits.float(), (self.t_cap.take() if self.t_cap is not None else None)
        finally:
            if self.t_cap is not None:
                self.t_cap.active = False

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, bf16: bool = False,
             device_type: str = "cpu") -> tuple[torch.Tensor, dict[str, float]]:
        t_logits, t_qkv = self.teacher_forward(x)
        if self.s_cap is not None:
            self.s_cap.active = True
        try:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            s_qkv = self.s_cap.take() if self.s_cap is not None else None
        finally:
            if self.s_cap is not None:
                self.s_cap.active = False
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        kd = kd_logit_loss(logits, t_logits, self.temperature)
        total = ce + self.weight * kd
        parts = {"lm_loss": ce.item(), "kd_loss": kd.item()}
        if s_qkv is not None:
            ad = attention_relation_loss(s_qkv, t_qkv, self.heads)
            total = total + self.attention_weight * ad
            parts["ad_loss"] = ad.item()
        return total, parts

    def describe(self) -> dict[str, Any]:
        cfg = self.teacher.config
        return {"arch": cfg.arch, "quant": cfg.quant, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                "vocab_size": cfg.vocab_size, "params": sum(p.numel() for p in self.teacher.parameters()),
                "dtype": str(self.teacher_dtype).replace("torch.", ""), "relation_heads": self.heads or None}

    def close(self) -> None:
        for cap in (self.s_cap, self.t_cap):
            if cap is not None:
                cap.remove()
