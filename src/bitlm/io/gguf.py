"""GGUF files in and out, for llama.cpp, bitnet.cpp and ik_llama.cpp: :func:`save_gguf`, :func:`load_gguf`.

With TQ2_0 / TQ1_0 projections the files use llama.cpp's ``bitnet`` architecture
(``LLM_ARCH_BITNET``, ``src/models/bitnet.cpp`` in llama.cpp; written with the ``gguf``
package's ``GGUFWriter``), so mainline llama.cpp and llama-cpp-python load them as they are.
``docs/gguf.md`` has the user-facing account, including what each runtime computes for which model.

The BitNet runtimes' files
--------------------------
bitnet.cpp (I2_S) and ik_llama.cpp (IQ2_BN, IQ2_BN_R4, IQ1_BN; it reads I2_S only to requantise
it) have their own tensor types, whose byte layouts live in :mod:`bitlm.io.gguf_types`, and run
2B4T-style models in the architecture ``bitnet-b1.58`` (the name of Microsoft's published
``ggml-model-i2_s.gguf``) or ``bitnet-25`` (the same graph under its first name).  Both build
that graph with ``build_bitnet_158``: llama's keys and tensor names, ``attn_sub_norm`` /
``ffn_sub_norm``, a **hard-coded ReLU²** gate (no key is read; bitlm's ``bitnet-2b4t``), and
``output.weight`` when present, else ``token_embd`` (tied).  Their ``bitnet`` architecture is the
SiLU graph above.  So :func:`load_gguf` reads ``bitnet-b1.58`` and ``bitnet-25`` as
``bitnet-2b4t`` (refusing a file whose ``<arch>.hidden_activation`` claims anything but relu2),
and :func:`save_gguf` writes ReLU² models with ``ternary_type="i2_s"`` as ``bitnet-b1.58``, with
the IQ types as ``bitnet-25`` (the name every ik_llama.cpp with 2B4T support knows), and SiLU
models as ``bitnet``; ``<arch>.hidden_activation`` is written in every case (the runtimes
ignore it).  I2_S holds bitlm's one float32 scale per tensor exactly, IQ2_BN / IQ2_BN_R4 hold it
exactly in every row's float32 scale, IQ1_BN rounds it to f16 (like TQ, with the exact value in
``bitlm.ternary_scales``).  A file whose IQ rows carry *different* scales (llama-quantize's
max-based scale of float weights) is refused like a TQ file with different block scales.

What llama.cpp's ``bitnet`` graph computes, and the one thing it does not say
-----------------------------------------------------------------------------
RMSNorm pre-norms, attention with NEOX RoPE (dims i and i + d/2 paired, the same as HF
``rotate_half`` and :func:`bitlm.model.apply_rope`, so q/k are written *without* the row
permutation llama.cpp's LLaMA converter applies), ``attn_sub_norm`` before ``attn_output``,
then a gated FFN with ``ffn_sub_norm`` before ``ffn_down``, and ``token_embd`` as the output
head.  The FFN gate is **hard-coded SiLU** (``build_ffn(..., LLM_FFN_SILU, LLM_FFN_PAR)``): that
is bitlm's ``bitnet-b1.58`` (SwiGLU).  bitlm's ``bitnet-2b4t`` (microsoft/bitnet-b1.58-2B-4T,
ReLU² gate) has the same tensors, so llama.cpp runs such a file without complaint and computes
the wrong function.  The key that says which activation a model uses is llama.cpp's
``<arch>.hidden_activation`` (the proposed BitNet ReLU² fix for llama.cpp and the converter fixes
of microsoft/BitNet write and read it):

    ``bitnet.hidden_activation`` = ``"silu"`` | ``"relu2"``   (:data:`ACTIVATION_KEY`)

bitlm writes it, plus its own earlier key ``bitnet.feed_forward_activation``
(:data:`LEGACY_ACTIVATION_KEY`) with the same value so that older bitlm versions read new files.
:func:`load_gguf` reads the standard key first, then the legacy one (both present and different:
refused).  A file with neither is refused with :class:`GGUFFormatError` naming the file and the
key — guessing would be wrong for half of the BitNet models — unless the caller says which
(``load_gguf(..., activation="silu")``, e.g. for llama.cpp's own converter output of a 1bitLLM
model, whose graph is SiLU).

Tensors (GGUF name ← bitlm parameter; GGUF lists dims innermost first, i.e. [in, out])
-------------------------------------------------------------------------------------
``token_embd.weight`` ← ``model.embed_tokens.weight`` and ``output.weight`` ← ``lm_head.weight``
(untied models only) in ``head_type`` (F16 default, F32 or Q8_0); ``output_norm.weight`` ←
``model.norm.weight``; per block N: ``blk.N.attn_norm`` ← ``input_layernorm``,
``blk.N.ffn_norm`` ← ``post_attention_layernorm``, ``blk.N.attn_sub_norm``,
``blk.N.ffn_sub_norm`` (norms always F32), and the seven projections ``blk.N.attn_q/k/v``,
``blk.N.attn_output``, ``blk.N.ffn_gate/up/down`` in TQ2_0 or TQ1_0.

The ternary scale
-----------------
TQ1_0 / TQ2_0 (ggml, PR #8151) store 256-weight blocks, each with its own f16 scale ``d``, and
dequantise to ``d · T``.  bitlm has one scale per tensor, W = s · T (``bitlm.quant``).  The
writer rounds s to f16 first and quantises the float tensor s₁₆ · T with ``gguf.quants``; its
quantiser sets ``d = max|block|``, which is exactly s₁₆ for every block holding a non-zero and
0 for an all-zero block (which dequantises to 0 whatever d is).  Dequantisation therefore
returns s₁₆ · T *exactly* (checked on write from the stored d bytes, and in the tests by
dequantising).  What llama.cpp computes with loses only the f16 rounding of s: relative error
≤ 2⁻¹¹ ≈ 4.9e-4 for s ≥ 6.1e-5 (f16's smallest normal), more below that (warned).  Small as that
is, int8 activation quantisation turns it into visible logit changes (rounding flips downstream:
~1 % relative on a random tiny model), so bitlm also writes the exact float32 scales, as the
arrays ``bitlm.ternary_tensors`` (names) and ``bitlm.ternary_scales`` (:data:`SCALES_KEY`);
llama.cpp ignores them.  :func:`load_gguf` reverses the encoding: every non-zero dequantised
weight of a projection must have the same magnitude (all blocks' d equal), giving T = sign(W);
s is the exact scale from ``bitlm.ternary_scales`` when that rounds to the stored d (else d,
e.g. for llama.cpp's converter output), pinned in a :class:`~bitlm.layers.FrozenTernaryLinear`.
So bitlm → GGUF → bitlm reproduces the logits bit for bit, and → GGUF again the same bytes.

A projection whose blocks have *different* d (e.g. llama-quantize run on a float model) is not
a BitNet tensor: it is refused with
:class:`GGUFFormatError`, unless ``allow_non_ternary=True`` loads it as a trainable ``BitLinear``
latent with a warning (bitlm then re-ternarises it with one absmean scale, so it computes a
different function than llama.cpp).  Optional ``blk.N.<proj>.scale`` tensors (F32, one value,
multiplied after the matmul by llama.cpp) are folded into s on load.

Rows whose length is not a multiple of 256 cannot be TQ-quantised; such projections are
written as F16 s₁₆ · T (still exact) with a warning, as llama.cpp's own converter falls back.

Tokenizer
---------
With ``tokenizer=`` (a ``bitlm.data.Tokenizer``, a ``tokenizers.Tokenizer`` or a path to a
tokenizer.json / folder) the GGUF gets llama.cpp's ``gpt2`` BPE vocabulary: ``tokens``,
``token_type`` (special → CONTROL, other added → USER_DEFINED, ids the tokenizer does not use
up to the model's vocab size → ``[PADn]`` UNUSED), ``merges``, bos/eos/pad ids,
``tokenizer.ggml.pre`` = ``"gpt-2"`` (llama.cpp's name for the GPT-2 split regex that bitlm's
byte-level BPE uses) or ``"llama-bpe"`` (LLaMA 3 / 2B4T tokenizers), and
``add_bos_token`` as the tokenizer's ``add_bos`` (false for bitlm's own tokenizers).  The exact tokenizer is also written
beside the model as ``<name>.tokenizer.json``, where
``bitlm.loading.load_tokenizer_for`` finds it.  :func:`load_gguf` rebuilds a tokenizer from the GGUF
vocabulary (:func:`gguf_tokenizer`; ``gpt-2`` and ``llama-bpe`` pre-tokenizers) and attaches it
as ``model.tokenizer`` (the sidecar wins when present).

Reading
-------
The reader is a small GGUF v2/v3 parser (header, key/values, tensor infos over an ``mmap``) so
that every problem — truncation, a bad key type, a missing or mis-shaped tensor — is raised as
:class:`GGUFFormatError` naming the file and the key or tensor; ``gguf.quants`` dequantises.
Writes go to a temp file in the target folder that is fsynced and renamed into place.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import quant as Q
from ..config import ModelConfig
from ..layers import FrozenTernaryLinear, ternary_latent
from ..model import BitNetModel
from . import gguf_types as GT
from . import require_bitnet_graph
from .atomic import atomic_write, atomic_write_text
from .hf import PROJECTIONS, _export_check, _ternary_of, assemble_model

__all__ = [
    "GGUFFormatError",
    "ARCH",
    "ACTIVATION_KEY",
    "LEGACY_ACTIVATION_KEY",
    "SCALES_KEY",
    "NAMES_KEY",
    "GROUPS_KEY",
    "GROUP_DIM_KEY",
    "GROUP_SCALES_KEY",
    "ACTIVATIONS",
    "TERNARY_TYPES",
    "HEAD_TYPES",
    "GGUFFile",
    "GGUFTensorInfo",
    "read_gguf",
    "save_gguf",
    "load_gguf",
    "gguf_tokenizer",
    "tokenizer_sidecar",
    "tensor_name_map",
]

#: llama.cpp's architecture name (``LLM_ARCH_BITNET`` → "bitnet" in llama-arch.cpp).
ARCH = "bitnet"
#: llama.cpp's key for the FFN gate activation (its bitnet graph hard-codes SiLU today).
ACTIVATION_KEY = f"{ARCH}.hidden_activation"
#: the key bitlm wrote before it used the standard one; still written and read.
LEGACY_ACTIVATION_KEY = f"{ARCH}.feed_forward_activation"
#: bitlm's keys for the exact float32 per-tensor scales (TQ blocks hold them rounded to f16).
NAMES_KEY, SCALES_KEY = "bitlm.ternary_tensors", "bitlm.ternary_scales"
#: Weight groups (2310.11453 Eq. 13): their count and dimension ("out" | "in" | "parallel", as
#: ``ModelConfig.weight_group_dim``), and the exact float32 scales, G per name of NAMES_KEY —
#: written instead of SCALES_KEY, so a bitlm without groups refuses such a file.
GROUPS_KEY, GROUP_DIM_KEY, GROUP_SCALES_KEY = "bitlm.weight_groups", "bitlm.weight_group_dim", "bitlm.ternary_group_scales"
#: activation value → bitlm architecture (the rest of the graph is the same).
ACTIVATIONS = {"silu": "bitnet-b1.58", "relu2": "bitnet-2b4t"}
#: the BitNet runtimes' ReLU² architecture names (bitnet.cpp and ik_llama.cpp: ``build_bitnet_158``,
#: ReLU² hard-coded, optional ``output.weight``).  ``bitnet-25`` is the name of the first 2B4T
#: files (ik_llama.cpp PR #337); Microsoft renamed it ``bitnet-b1.58`` in April 2025 (the
#: published ``ggml-model-i2_s.gguf``), same tensors, same graph.
RELU2_ARCHS = ("bitnet-b1.58", "bitnet-25")
#: every general.architecture bitlm reads
ARCHS = (ARCH, *RELU2_ARCHS)
_ARCH_TO_ACTIVATION = {v: k for k, v in ACTIVATIONS.items()}
TERNARY_TYPES = ("tq2_0", "tq1_0", "i2_s", "iq2_bn", "iq1_bn", "iq2_bn_r4")
HEAD_TYPES = ("f16", "f32", "q8_0")
QK_K = 256  # TQ1_0 / TQ2_0 block length along a row (ggml's QK_K)

# bitlm projection → llama.cpp tensor base name (blk.N.<base>.weight)
_PROJ_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORM_TO_GGUF = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm",
}

# ggml type ids used below (gguf.GGMLQuantizationType; fixed by the file format)
_F32, _F16, _Q8_0, _BF16, _TQ1_0, _TQ2_0 = 0, 1, 8, 30, 34, 35
_FLOAT_TYPES = {_F32: "<f4", _F16: "<f2"}  # read directly; BF16 and quantised types via gguf.quants
# llama_ftype values for general.file_type (LLAMA_FTYPE_MOSTLY_TQ1_0 / _TQ2_0)
_FILE_TYPE = {"tq1_0": 36, "tq2_0": 37,
              "i2_s": 40,  # LLAMA_FTYPE_MOSTLY_I2_S, as in Microsoft's published 2B4T file
              "iq1_bn": 136, "iq2_bn": 137, "iq2_bn_r4": 337}  # ik_llama.cpp's llama.h

# GGUF token types (gguf.TokenType)
_TT_NORMAL, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 3, 4, 5, 6

# llama.cpp's "llama-bpe" pre-tokenizer regex (LLaMA 3, and the 2B4T tokenizer)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFFormatError(ValueError):
    """A GGUF file bitlm cannot read (or a model it cannot write): names the file and the
    key or tensor at fault."""


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - gguf is in the [gguf] and [dev] extras
        # ModuleNotFoundError with .name: bitlm.cli reports it as a missing optional package
        raise ModuleNotFoundError("GGUF support needs the 'gguf' package: pip install 'bitlm[gguf]'", name="gguf") from None
    return gguf


def tokenizer_sidecar(path: str | Path) -> Path:
    """``model.gguf`` → ``model.tokenizer.json`` (where ``bitlm.loading.load_tokenizer_for`` looks)."""
    return Path(path).with_suffix(".tokenizer.json")


def tensor_name_map(cfg: ModelConfig) -> dict[str, str]:
    """bitlm parameter name → GGUF tensor name, for every tensor of a ``cfg`` model file."""
    out = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        for ours, theirs in _NORM_TO_GGUF.items():
            out[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
        for ours, theirs in _PROJ_TO_GGUF.items():
            out[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return out


# =============================================================================================
# Reading: a small GGUF parser
# =============================================================================================

_SCALARS = {  # GGUF value type → (struct format, numpy dtype)
    0: ("<B", "u1"), 1: ("<b", "i1"), 2: ("<H", "<u2"), 3: ("<h", "<i2"), 4: ("<I", "<u4"),
    5: ("<i", "<i4"), 6: ("<f", "<f4"), 7: ("<?", "?"), 10: ("<Q", "<u8"), 11: ("<q", "<i8"),
    12: ("<d", "<f8"),
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensorInfo:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: innermost (row length) first
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch order (outermost first): [out, in] for a weight matrix."""
        return tuple(reversed(self.dims))

    @property
    def type_name(self) -> str:
        if self.ggml_type in GT.TYPE_NAMES:
            return GT.TYPE_NAMES[self.ggml_type]
        try:
            return _gguf().GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata, tensor index, and lazy access to tensor bytes."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    _mm: Any = field(default=None, repr=False)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes (a read-only view): typed for F32/F16, uint8 blocks per row for
        ggml's block types, flat uint8 for the BitNet runtimes' types (I2_S ends in a tail)."""
        info = self.tensors[name]
        buf = np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if info.ggml_type in GT.TYPE_NAMES:
            return buf
        if info.ggml_type in _FLOAT_TYPES:
            return buf.view(_FLOAT_TYPES[info.ggml_type]).reshape(info.shape)
        return buf.reshape(*info.shape[:-1], -1)  # (…, bytes per row)

    def floats(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor dequantised to float32 (a fresh array), in numpy order; ``rows`` (start,
        stop): only those rows of a 2-D tensor stored as floats or ggml blocks (an embedding
        read in slices keeps the temporaries small)."""
        info = self.tensors[name]
        if info.ggml_type in GT.TYPE_NAMES:
            if rows is not None:
                raise ValueError(f"{name}: row slices of {info.type_name} tensors are not supported")
            t, d = self.ternary(name)
            return (t.astype(np.float32) * d[:, None]).reshape(info.shape)
        raw = self.raw(name)
        shape = info.shape
        if rows is not None:
            if len(shape) != 2:
                raise ValueError(f"{name}: row slices need a 2-D tensor, this one has shape {shape}")
            raw = raw[rows[0]:rows[1]]
            shape = (raw.shape[0], shape[1])
        if info.ggml_type in _FLOAT_TYPES:
            return raw.astype(np.float32)
        gguf = _gguf()
        try:
            out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.ggml_type))
        except (NotImplementedError, ValueError) as e:
            raise self.err(name, f"has type {info.type_name}, which bitlm cannot dequantise ({e})") from None
        return np.asarray(out, dtype=np.float32).reshape(shape)

    def ternary(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(T int8 [rows, n], scale per row float32) of an I2_S / IQ1_BN / IQ2_BN / IQ2_BN_R4
        tensor (``bitlm.io.gguf_types``); refuses bytes that do not fit the type's layout."""
        info = self.tensors[name]
        try:
            return GT.decode(info.ggml_type, self.raw(name), info.dims)
        except ValueError as e:
            raise self.err(name, f"({info.type_name}) {e}") from None

    def err(self, name: str, msg: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: tensor {name!r} {msg}")

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map closes with it
                pass
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Cursor:
    """Bounds-checked little-endian reads; every overrun is reported as truncation."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path}: truncated or corrupt while reading {what} "
                                  f"(needs {n} bytes at offset {self.pos}, the file has {self.size})")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path}: {what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str) -> Any:
        if vtype == 6:
            # float32: the shortest decimal that rounds to it (1e-05, not 9.99999974e-06), so a
            # config written by bitlm reads back equal and float32 maths sees the same value
            return float(str(np.float32(self.unpack("<f", what))))
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype][0], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            sub = self.unpack("<I", what)
            n = self.unpack("<Q", what)
            if sub in _SCALARS:
                dt = np.dtype(_SCALARS[sub][1])
                return np.frombuffer(self.take(n * dt.itemsize, what), dtype=dt).copy()
            if sub == _STRING:
                if n * 8 > self.size - self.pos:  # each string needs at least its length field
                    raise GGUFFormatError(f"{self.path}: truncated or corrupt {what} ({n} strings announced)")
                return [self.string(what) for _ in range(n)]
            raise GGUFFormatError(f"{self.path}: {what} is an array of unsupported type {sub}")
        raise GGUFFormatError(f"{self.path}: {what} has unknown value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor index of a GGUF v2/v3 file (tensor data stays on
    disk, memory-mapped).  Raises :class:`GGUFFormatError` naming the file and the key/tensor."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{path}: truncated ({size} bytes; a GGUF header alone has 24)")
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm, gguf)
    except BaseException:
        mm.close()
        raise


def _parse(path: Path, mm: Any, gguf: Any) -> GGUFFile:
    c = _Cursor(mm, path)
    if c.take(4, "the magic") != b"GGUF":
        raise GGUFFormatError(f"{path}: not a GGUF file (bad magic)")
    version = c.unpack("<I", "the version")
    if version & 0xFFFF == 0 and version:
        raise GGUFFormatError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: unsupported GGUF version {version} (bitlm reads versions 2 and 3)")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the key/value count")
    if n_kv * 12 > c.size - c.pos or n_tensors * 24 > c.size - c.pos:  # sanity before looping
        raise GGUFFormatError(f"{path}: truncated or corrupt header ({n_tensors} tensors, {n_kv} keys announced)")
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key #{i}")
        vtype = c.unpack("<I", f"the type of key {key!r}")
        if key in meta:
            raise GGUFFormatError(f"{path}: duplicate key {key!r}")
        meta[key] = c.value(vtype, f"key {key!r}")
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"{path}: key 'general.alignment' must be a power of two, got {alignment!r}")

    infos: list[tuple[str, int, tuple[int, ...], int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        if name in seen:
            raise GGUFFormatError(f"{path}: duplicate tensor {name!r}")
        seen.add(name)
        n_dims = c.unpack("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= 4:
            raise GGUFFormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (ggml allows 1 to 4)")
        dims = tuple(c.unpack("<Q", f"tensor {name!r}") for _ in range(n_dims))
        ggml_type = c.unpack("<I", f"tensor {name!r}")
        offset = c.unpack("<Q", f"tensor {name!r}")
        infos.append((name, ggml_type, dims, offset))
    data_start = -(-c.pos // alignment) * alignment

    tensors: dict[str, GGUFTensorInfo] = {}
    for name, ggml_type, dims, offset in infos:
        if ggml_type in GT.TYPE_NAMES:  # the BitNet runtimes' own types, unknown to the gguf package
            problem = GT.shape_problem(ggml_type, dims)
            if problem:
                raise GGUFFormatError(f"{path}: tensor {name!r} ({GT.TYPE_NAMES[ggml_type]}) {problem}")
            tensors[name] = _tensor_info(path, c, name, ggml_type, dims, data_start, offset, alignment,
                                         GT.nbytes(ggml_type, dims))
            continue
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
        if dims[0] % block:
            raise GGUFFormatError(f"{path}: tensor {name!r} has rows of {dims[0]} values, not a multiple of "
                                  f"its type's block of {block}")
        nbytes = math.prod(dims) // block * type_size
        tensors[name] = _tensor_info(path, c, name, ggml_type, dims, data_start, offset, alignment, nbytes)
    _check_extents(path, tensors, alignment)
    return GGUFFile(path, version, meta, tensors, mm)


def _tensor_info(path: Path, c: _Cursor, name: str, ggml_type: int, dims: tuple[int, ...], data_start: int,
                 offset: int, alignment: int, nbytes: int) -> GGUFTensorInfo:
    start = data_start + offset
    if offset % alignment:
        raise GGUFFormatError(f"{path}: tensor {name!r} has misaligned data offset {offset}")
    if start + nbytes > c.size:
        raise GGUFFormatError(f"{path}: tensor {name!r} is truncated: its data ends at byte {start + nbytes} "
                              f"but the file has {c.size} bytes")
    return GGUFTensorInfo(name, ggml_type, dims, start, nbytes)


def _check_extents(path: Path, tensors: dict[str, GGUFTensorInfo], alignment: int) -> None:
    """Each tensor's bytes end before the next tensor's begin; an I2_S tensor fills exactly its
    n/4 + 32 bytes (plus alignment padding) — a file from a writer with another I2_S size is refused."""
    order = sorted(tensors.values(), key=lambda i: i.offset)
    for cur, nxt in zip(order, order[1:]):
        room = nxt.offset - cur.offset
        padded = -(-cur.nbytes // alignment) * alignment
        if room < cur.nbytes or (cur.ggml_type == GT.I2_S and room > padded):
            raise GGUFFormatError(f"{path}: tensor {cur.name!r} ({cur.type_name}, dims {list(cur.dims)}) has "
                                  f"{room} bytes before the next tensor; its type needs {cur.nbytes}"
                                  + (f" (padded to {padded})" if padded != cur.nbytes else ""))


# =============================================================================================
# Metadata → ModelConfig
# =============================================================================================


def _key(f: GGUFFile, key: str, kind: type, default: Any = ...) -> Any:
    """``key`` as an int / float / str; per-layer arrays must be uniform (bitlm has one value)."""
    if key not in f.metadata:
        if default is ...:
            raise GGUFFormatError(f"{f.path}: missing key {key!r}")
        return default
    v = f.metadata[key]
    if isinstance(v, np.ndarray) and kind is not str:
        if v.size == 0 or not (v == v.flat[0]).all():
            raise GGUFFormatError(f"{f.path}: key {key!r} varies per layer ({v.tolist()}); bitlm needs one value")
        v = v.flat[0].item()
    if kind is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if kind is float and isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if kind is str and isinstance(v, str):
        return v
    raise GGUFFormatError(f"{f.path}: key {key!r} has the wrong type ({type(v).__name__}: {v!r}); "
                          f"expected {kind.__name__}")


def _read_activation(f: GGUFFile, activation: str | None, arch: str = ARCH) -> str:
    """The FFN activation: the standard key, else bitlm's legacy key, else the caller's ``activation``;
    a file that says nothing is refused (silu and relu2 models have the same tensors).  The
    BitNet runtimes' ``bitnet-b1.58`` / ``bitnet-25`` graphs are ReLU², whatever a key says."""
    if arch in RELU2_ARCHS:
        key = f"{arch}.hidden_activation"
        said = f.metadata.get(key, "relu2")
        if said != "relu2":
            raise GGUFFormatError(f"{f.path}: key {key!r} = {said!r}, but the {arch!r} graph of bitnet.cpp and "
                                  "ik_llama.cpp is ReLU² (relu2); a SiLU model belongs in architecture 'bitnet'")
        if activation not in (None, "relu2"):
            raise GGUFFormatError(f"{f.path}: architecture {arch!r} is ReLU² (relu2), but activation={activation!r} "
                                  "was asked for")
        return "relu2"
    found = {k: f.metadata[k] for k in (ACTIVATION_KEY, LEGACY_ACTIVATION_KEY) if k in f.metadata}
    for key, v in found.items():
        if v not in ACTIVATIONS:
            raise GGUFFormatError(f"{f.path}: key {key!r} = {v!r} is not supported "
                                  f"(expected one of {', '.join(ACTIVATIONS)})")
    if len(set(found.values())) > 1:
        raise GGUFFormatError(f"{f.path}: key {ACTIVATION_KEY!r} = {found[ACTIVATION_KEY]!r} contradicts "
                              f"{LEGACY_ACTIVATION_KEY!r} = {found[LEGACY_ACTIVATION_KEY]!r}")
    act = next(iter(found.values()), None)
    if activation is not None and act is not None and activation != act:
        raise GGUFFormatError(f"{f.path}: key {next(iter(found))!r} = {act!r} but activation={activation!r} was asked for")
    act = act or activation
    if act is None:
        raise GGUFFormatError(f"{f.path}: missing key {ACTIVATION_KEY!r} (the FFN activation, 'silu' or 'relu2', "
                              "cannot be told from the tensors; pass activation='silu' or 'relu2' to load_gguf)")
    return act


def _read_config(f: GGUFFile, quant: str | None, activation: str | None = None) -> ModelConfig:
    arch = f.metadata.get("general.architecture")
    if arch not in ARCHS:
        raise GGUFFormatError(f"{f.path}: architecture {arch!r} (key 'general.architecture') is not supported; "
                              f"bitlm reads {', '.join(repr(a) for a in ARCHS)}")
    a = arch
    act = _read_activation(f, activation, arch)
    d = _key(f, f"{a}.embedding_length", int)
    heads = _key(f, f"{a}.attention.head_count", int)
    if "token_embd.weight" not in f.tensors:
        raise GGUFFormatError(f"{f.path}: missing tensor 'token_embd.weight'")
    emb = f.tensors["token_embd.weight"]
    if len(emb.dims) != 2 or emb.dims[0] != d:
        raise f.err("token_embd.weight", f"has dims {list(emb.dims)}; expected [{d}, n_vocab] "
                                         f"({a}.embedding_length = {d})")
    vocab = emb.dims[1]
    if f"{a}.vocab_size" in f.metadata and _key(f, f"{a}.vocab_size", int) != vocab:
        raise GGUFFormatError(f"{f.path}: key '{a}.vocab_size' = {f.metadata[f'{a}.vocab_size']} but "
                              f"token_embd.weight has {vocab} rows")
    if f.metadata.get(f"{a}.rope.scaling.type", "none") not in ("none", ""):
        raise GGUFFormatError(f"{f.path}: key '{a}.rope.scaling.type' = {f.metadata[f'{a}.rope.scaling.type']!r} "
                              "is not supported (plain RoPE only)")
    try:
        cfg = ModelConfig(
            arch=ACTIVATIONS[act],
            quant=quant or "b1.58",
            vocab_size=vocab,
            d_model=d,
            n_layers=_key(f, f"{a}.block_count", int),
            n_heads=heads,
            n_kv_heads=_key(f, f"{a}.attention.head_count_kv", int, heads),
            d_ff=_key(f, f"{a}.feed_forward_length", int),
            max_seq_len=_key(f, f"{a}.context_length", int),
            rope_theta=_key(f, f"{a}.rope.freq_base", float, 10000.0),  # llama.cpp's default
            norm_eps=_key(f, f"{a}.attention.layer_norm_rms_epsilon", float),
            tie_embeddings="output.weight" not in f.tensors,
            weight_groups=_key(f, GROUPS_KEY, int, 1),
            weight_group_dim=_key(f, GROUP_DIM_KEY, str, "out"),
        )
    except ValueError as e:
        raise GGUFFormatError(f"{f.path}: metadata describes no valid model: {e}") from None
    for key in (f"{a}.rope.dimension_count", f"{a}.attention.key_length", f"{a}.attention.value_length"):
        if key in f.metadata and _key(f, key, int) != cfg.head_dim:
            raise GGUFFormatError(f"{f.path}: key {key!r} = {f.metadata[key]} but bitlm needs the head size "
                                  f"{cfg.head_dim} (embedding_length / head_count; partial RoPE is not supported)")
    return cfg


# =============================================================================================
# load_gguf
# =============================================================================================


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name → numpy-order shape, for every tensor a ``cfg`` file must hold."""
    d, f, hd = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    proj = {"attn_q": (cfg.n_heads * hd, d), "attn_k": (cfg.kv_heads * hd, d), "attn_v": (cfg.kv_heads * hd, d),
            "attn_output": (d, cfg.n_heads * hd), "ffn_gate": (f, d), "ffn_up": (f, d), "ffn_down": (d, f)}
    norm = {"attn_norm": (d,), "ffn_norm": (d,), "attn_sub_norm": (cfg.n_heads * hd,), "ffn_sub_norm": (f,)}
    out = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
    if not cfg.tie_embeddings:
        out["output.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layers):
        out.update({f"blk.{i}.{k}.weight": v for k, v in {**norm, **proj}.items()})
    return out


def _ternary(f: GGUFFile, name: str) -> tuple[torch.Tensor, float, float] | np.ndarray:
    """(T int8, s, c) when every non-zero weight of ``name`` has one magnitude s, with c the
    value of the optional ``.scale`` tensor (1.0 if absent; W = c·s·T); otherwise the
    dequantised float weights (times c)."""
    c = _scale_tensor(f, name)
    if f.tensors[name].ggml_type in GT.TYPE_NAMES:  # codes and scales straight from the bytes
        t, d = f.ternary(name)
        if not np.isfinite(d).all():
            raise f.err(name, "has a scale that is inf or nan")
        used = np.unique(d[(t != 0).any(axis=1) & (d != 0)])  # a zero row or scale holds no information
        if used.size > 1:
            return (t.astype(np.float32) * d[:, None]) * np.float32(c)
        s = float(abs(used[0])) if used.size else Q.SCALE_EPS
        if used.size and used[0] < 0:
            t = -t
        t = np.where(d[:, None] == 0, 0, t).astype(np.int8)
        return torch.from_numpy(t.reshape(f.tensors[name].shape)), s, c
    w = f.floats(name)
    if not np.isfinite(w).all():
        raise f.err(name, "contains inf or nan")
    absw = np.abs(w)
    nz = absw[absw != 0]
    if nz.size and not (nz == nz[0]).all():
        return w * np.float32(c)
    s = float(nz[0]) if nz.size else Q.SCALE_EPS  # an all-zero tensor: any scale computes the same
    return torch.from_numpy(np.sign(w).astype(np.int8)), s, c


def _ternary_grouped(f: GGUFFile, name: str, groups: int, dim: str) -> tuple[torch.Tensor, list[float], float] | np.ndarray:
    """:func:`_ternary` for a weight with ``groups`` scales along ``dim`` ("out" rows / "in"
    columns): (T, [s_g], c) when every group's non-zero weights share one magnitude s_g."""
    c = _scale_tensor(f, name)
    w = f.floats(name)
    if not np.isfinite(w).all():
        raise f.err(name, "contains inf or nan")
    rows = Q._grouped_rows(torch.from_numpy(np.abs(w)), groups, dim)  # (G, N·K/G)
    scales = []
    for r in rows:
        nz = r[r != 0]
        if nz.numel() and not bool((nz == nz[0]).all()):
            return w * np.float32(c)
        scales.append(float(nz[0]) if nz.numel() else Q.SCALE_EPS)
    return torch.from_numpy(np.sign(w).astype(np.int8)), scales, c


def _group_scales(f: GGUFFile, groups: int) -> dict[str, list[float]]:
    """GGUF tensor name → its G exact float32 group scales (:data:`GROUP_SCALES_KEY`)."""
    names, scales = f.metadata.get(NAMES_KEY), f.metadata.get(GROUP_SCALES_KEY)
    if names is None and scales is None:
        return {}
    ok = (isinstance(names, list) and isinstance(scales, np.ndarray) and scales.dtype == np.float32
          and scales.size == groups * len(names))
    if not ok or not np.isfinite(scales).all() or (scales <= 0).any():
        raise GGUFFormatError(f"{f.path}: keys {NAMES_KEY!r} / {GROUP_SCALES_KEY!r} must be a string array and a "
                              f"float32 array of {groups} positive scales per name")
    return {n: [float(v) for v in scales[i * groups:(i + 1) * groups]] for i, n in enumerate(names)}


def _scale_tensor(f: GGUFFile, name: str) -> float:
    """The optional ``.scale`` tensor of a projection (1.0 when absent)."""
    scale_name = name.removesuffix(".weight") + ".scale"
    c = 1.0
    if scale_name in f.tensors:  # llama.cpp multiplies the matmul result by it (build_lora_mm)
        sc = f.floats(scale_name).reshape(-1)
        if sc.size != 1 or not np.isfinite(sc).all() or sc[0] <= 0:
            raise f.err(scale_name, f"must hold one positive finite value, got {sc.tolist()}")
        c = float(sc[0])
    return c


def _exact_scales(f: GGUFFile) -> dict[str, float]:
    """GGUF tensor name → exact float32 scale, from bitlm's keys (empty when absent)."""
    names, scales = f.metadata.get(NAMES_KEY), f.metadata.get(SCALES_KEY)
    if names is None and scales is None:
        return {}
    ok = (isinstance(names, list) and isinstance(scales, np.ndarray) and scales.dtype == np.float32
          and len(names) == scales.size)
    if not ok or not np.isfinite(scales).all() or (scales <= 0).any():
        raise GGUFFormatError(f"{f.path}: keys {NAMES_KEY!r} / {SCALES_KEY!r} must be a string array and a "
                              "float32 array of positive scales of the same length")
    return {n: float(v) for n, v in zip(names, scales)}


def _describe_non_ternary(f: GGUFFile, name: str, w: np.ndarray) -> str:
    info = f.tensors[name]
    if info.ggml_type in (GT.IQ1_BN, GT.IQ2_BN, GT.IQ2_BN_R4):
        d = np.unique(f.ternary(name)[1])
        return (f"its {info.type_name} rows have {d.size} different scales d ({d.min():.4g} .. {d.max():.4g}), "
                "as llama-quantize makes from float weights")
    if info.ggml_type in (_TQ1_0, _TQ2_0):
        d = f.raw(name).reshape(-1, info.nbytes // (math.prod(info.dims) // QK_K))[:, -2:].copy().view("<f2")
        d = np.unique(d[d != 0].astype(np.float32))
        return f"its {info.type_name} blocks have {d.size} different scales d ({d.min():.4g} .. {d.max():.4g})"
    mags = np.unique(np.abs(w[w != 0]))
    return f"it has {mags.size} different magnitudes ({info.type_name}), not s·T with one scale s"


def load_gguf(
    path: str | Path,
    quant: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    allow_non_ternary: bool = False,
    activation: str | None = None,
) -> BitNetModel:
    """Load a GGUF as a :class:`~bitlm.model.BitNetModel` in eval mode: llama.cpp's ``bitnet``
    (written by bitlm or llama.cpp's converter) or the BitNet runtimes' ``bitnet-b1.58`` /
    ``bitnet-25`` (Microsoft's I2_S file, ik_llama.cpp's IQ2_BN / IQ2_BN_R4 / IQ1_BN; always ReLU²).

    ``quant`` chooses the projection modules, as in :func:`bitlm.io.hf.load_hf`: None (default)
    → :class:`~bitlm.layers.FrozenTernaryLinear` holding exactly the stored T and s; "b1.58" →
    trainable ``BitLinear`` latents (s/p)·T that re-quantise to T and s; "fp" → ``nn.Linear``
    with s·T (activations unquantised).  Projections that are not one-scale ternary tensors
    raise :class:`GGUFFormatError` unless ``allow_non_ternary`` (then: ``BitLinear`` latents
    holding the dequantised weights, or ``nn.Linear`` for "fp", with a warning).

    The architecture comes from :data:`ACTIVATION_KEY` ("silu" → ``bitnet-b1.58``, "relu2" →
    ``bitnet-2b4t``), else :data:`LEGACY_ACTIVATION_KEY`, else ``activation`` (for files that
    do not say, e.g. llama.cpp's converter output); a file without either key and no
    ``activation`` is refused.  Attached: ``model.gguf_path``, ``model.gguf_metadata`` (all keys but the
    ``tokenizer.ggml.*`` arrays) and ``model.tokenizer`` (the sidecar ``<name>.tokenizer.json``
    if present, else rebuilt from the GGUF vocabulary, else None).
    """
    if quant not in (None, "fp", "b1.58"):
        raise ValueError(f"quant must be None, 'fp' or 'b1.58', got {quant!r}")
    if activation not in (None, *ACTIVATIONS):
        raise ValueError(f"activation must be None or one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    path = Path(path)
    with read_gguf(path) as f:
        cfg = _read_config(f, quant, activation)
        model = _load_tensors(f, cfg, quant, dtype, allow_non_ternary)
        meta = f.metadata
    model.gguf_path = path
    model.gguf_metadata = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")
                           or k.endswith(("_id", ".model", ".pre"))}
    model.tokenizer = _attached_tokenizer(path, meta)
    return model


def _check_tensors(f: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The file holds exactly the tensors ``cfg`` implies, with their shapes (else GGUFFormatError)."""
    expected = _expected_shapes(cfg)
    scales = {n.removesuffix(".weight") + ".scale" for n in expected if n.startswith("blk.")
              and n.split(".")[2] in _PROJ_TO_GGUF.values()}
    missing = [n for n in expected if n not in f.tensors]
    if missing:
        raise GGUFFormatError(f"{f.path}: missing tensor {missing[0]!r} ({len(missing)} missing; the metadata "
                              f"describes {cfg.n_layers} blocks)")
    extra = [n for n in f.tensors if n not in expected and n not in scales]
    if extra:
        raise f.err(extra[0], f"is unexpected ({len(extra)} unexpected tensors; the metadata describes "
                              f"{cfg.n_layers} blocks)")
    for name, shape in expected.items():
        got = f.tensors[name].shape
        if tuple(got) != tuple(shape):
            raise f.err(name, f"has shape {list(f.tensors[name].dims)} (GGUF order, innermost first); "
                              f"the metadata implies {list(reversed(shape))}")
    return expected


def _stored_scale(f: GGUFFile, gname: str, s: float, c: float, exact: dict[str, float], ignored: list[str]) -> float:
    """The scale a one-scale ternary projection computes with: bitlm's exact float32 scale
    (:data:`SCALES_KEY`) when it rounds to the stored one (else the stored one; ``gname`` is
    added to ``ignored``), times the ``.scale`` tensor's ``c`` in one float32 rounding."""
    if gname in exact:
        f16 = f.tensors[gname].ggml_type in (_F16, _TQ1_0, _TQ2_0, GT.IQ1_BN)  # scales stored as f16
        rounded = np.float32(np.float16(exact[gname])) if f16 else np.float32(exact[gname])
        if rounded == np.float32(s):
            s = exact[gname]
        else:  # the tensor was rewritten by another tool: trust what llama.cpp computes with
            ignored.append(gname)
    if c != 1.0:
        s = float(np.float32(s) * np.float32(c))  # one float32 rounding, as llama.cpp's multiply
    return s


def _warn_ignored_scales(f: GGUFFile, ignored: list[str]) -> None:
    if ignored:
        warnings.warn(f"{f.path}: {SCALES_KEY!r} does not match the stored scale of {len(ignored)} projections "
                      f"(first: {ignored[0]}); using the stored (f16) scales", stacklevel=4)


def _norm_floats(f: GGUFFile, gname: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    """A norm weight, embedding or head (``rows``: a slice of its rows) as float32 (norms must be
    stored as floats; no inf / nan)."""
    if len(f.tensors[gname].dims) == 1 and f.tensors[gname].ggml_type not in (_F32, _F16, _BF16):
        raise f.err(gname, f"has type {f.tensors[gname].type_name}; norm weights must be F32, F16 or BF16")
    w = f.floats(gname, rows)
    if not np.isfinite(w).all():
        raise f.err(gname, "contains inf or nan")
    return w


class GroupedGGUF(GGUFFormatError):
    """A GGUF with weight groups: :class:`TernaryReader` leaves it to ``load_gguf``."""


class TernaryReader:
    """A one-scale ternary GGUF read one tensor at a time, by bitlm parameter name: what
    ``load_gguf(path)`` holds (the same T, s, norms and embeddings), without building float s·T
    torch modules — ``bitlm.engine.convert_gguf`` packs from it with a few hundred MB of
    temporaries where the torch model of a 2B4T file takes ~12 GB.  Use as a context manager.
    Refuses (GGUFFormatError) what only ``load_gguf`` handles: weight groups, and projections
    that are not one-scale ternary tensors (``allow_non_ternary``)."""

    def __init__(self, path: str | Path, activation: str | None = None) -> None:
        if activation not in (None, *ACTIVATIONS):
            raise ValueError(f"activation must be None or one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.path = Path(path)
        self.f = read_gguf(self.path)
        try:
            self.config = _read_config(self.f, None, activation)
            if self.config.weight_groups > 1:
                raise GroupedGGUF(f"{self.path}: {self.config.weight_groups} weight groups per tensor: "
                                      "load it with bitlm.load (the group-wise reader)")
            _check_tensors(self.f, self.config)
            self._gguf = tensor_name_map(self.config)
            self._exact = _exact_scales(self.f)
        except BaseException:
            self.f.close()
            raise
        self._ignored: list[str] = []

    def __enter__(self) -> TernaryReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        _warn_ignored_scales(self.f, self._ignored)
        self._ignored = []
        self.f.close()

    def ternary(self, name: str) -> tuple[torch.Tensor, float]:
        """(T int8 (N, K), s) of projection ``name`` (e.g. ``model.layers.0.self_attn.q_proj.weight``)."""
        gname = self._gguf[name]
        got = _ternary(self.f, gname)
        if isinstance(got, np.ndarray):
            raise self.f.err(gname, f"is not a per-tensor-scale ternary weight: "
                                    f"{_describe_non_ternary(self.f, gname, got)}; bitlm.load(path, "
                                    "allow_non_ternary=True) reads it as a latent weight")
        t, s, c = got
        return t, _stored_scale(self.f, gname, s, c, self._exact, self._ignored)

    def floats(self, name: str) -> torch.Tensor:
        """A norm weight, the embedding or the untied head as float32."""
        return torch.from_numpy(_norm_floats(self.f, self._gguf[name]))

    def float_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the embedding or the untied head as float32."""
        return torch.from_numpy(_norm_floats(self.f, self._gguf[name], (start, stop)))

    @property
    def metadata(self) -> dict[str, Any]:
        return self.f.metadata


def _load_tensors(f: GGUFFile, cfg: ModelConfig, quant: str | None, dtype: torch.dtype,
                  allow_non_ternary: bool) -> BitNetModel:
    expected = _check_tensors(f, cfg)
    names = {v: k for k, v in tensor_name_map(cfg).items()}  # GGUF → bitlm
    if cfg.weight_groups > 1:
        return _load_grouped(f, cfg, expected, names, quant, dtype)
    exact = _exact_scales(f)
    ignored: list[str] = []
    sd: dict[str, torch.Tensor] = {}
    frozen: dict[str, FrozenTernaryLinear] = {}
    latent: list[str] = []
    for gname in expected:
        ours = names[gname]
        base = ours.removesuffix(".weight")
        if not base.endswith(tuple(PROJECTIONS)):
            sd[ours] = torch.from_numpy(_norm_floats(f, gname)).to(dtype)
            continue
        got = _ternary(f, gname)
        if isinstance(got, np.ndarray):
            if not allow_non_ternary:
                raise f.err(gname, f"is not a per-tensor-scale ternary weight: {_describe_non_ternary(f, gname, got)}; "
                                   "pass allow_non_ternary=True to load it as a BitLinear latent weight")
            latent.append(gname)  # stays the BitLinear (or nn.Linear for "fp") BitNetModel builds
            sd[ours] = torch.from_numpy(got).to(dtype)
        else:
            t, s, c = got
            s = _stored_scale(f, gname, s, c, exact, ignored)
            if quant is None:
                frozen[base] = FrozenTernaryLinear.from_ternary(t, torch.tensor([s]), dtype)
                continue
            sd[ours] = ternary_latent(t, s, dtype) if quant == "b1.58" else (t.float() * s).to(dtype)
        if cfg.quant != "fp":
            sd[base + ".quant_lambda"] = torch.tensor(1.0)
    _warn_ignored_scales(f, ignored)
    if latent:
        warnings.warn(f"{f.path}: {len(latent)} projections (first: {latent[0]}) are not one-scale ternary "
                      "tensors; loaded as BitLinear latents that bitlm re-ternarises with one absmean scale, "
                      "so the model computes a different function than llama.cpp does with this file",
                      stacklevel=3)
    return assemble_model(cfg, sd, frozen, str(f.path), GGUFFormatError)


def _load_grouped(f: GGUFFile, cfg: ModelConfig, expected: dict[str, tuple[int, ...]], names: dict[str, str],
                  quant: str | None, dtype: torch.dtype) -> BitNetModel:
    """:func:`_load_tensors` for a file written with weight groups (:data:`GROUPS_KEY`): every
    projection must be G-scale ternary (refused otherwise, naming the tensor); s_g is the exact
    scale of :data:`GROUP_SCALES_KEY` when that rounds to the stored f16 value."""
    groups = cfg.weight_groups
    exact = _group_scales(f, groups)
    sd: dict[str, torch.Tensor] = {}
    frozen: dict[str, FrozenTernaryLinear] = {}
    for gname in expected:
        ours = names[gname]
        base = ours.removesuffix(".weight")
        if not base.endswith(tuple(PROJECTIONS)):
            w = f.floats(gname)
            if not np.isfinite(w).all():
                raise f.err(gname, "contains inf or nan")
            sd[ours] = torch.from_numpy(w).to(dtype)
            continue
        dim = cfg.weight_group_dim
        if dim == "parallel":  # o / down split input columns (row-parallel), the rest output rows
            dim = "in" if base.endswith(("o_proj", "down_proj")) else "out"
        got = _ternary_grouped(f, gname, groups, dim)
        if isinstance(got, np.ndarray):
            raise f.err(gname, f"is not a {groups}-group ternary weight ({GROUPS_KEY} = {groups}, "
                               f"{GROUP_DIM_KEY} = {cfg.weight_group_dim!r}): some group holds several magnitudes")
        t, s, c = got
        f16 = f.tensors[gname].ggml_type in (_F16, _TQ1_0, _TQ2_0)
        for g, e in enumerate(exact.get(gname, [])):
            if (np.float32(np.float16(e)) if f16 else np.float32(e)) == np.float32(s[g]):
                s[g] = e
        if c != 1.0:
            s = [float(np.float32(v) * np.float32(c)) for v in s]
        st = torch.tensor(s, dtype=torch.float32)
        if quant is None:
            frozen[base] = FrozenTernaryLinear.from_ternary(t, st, dtype, weight_groups=groups, weight_group_dim=dim)
            continue
        if quant == "b1.58":
            sd[ours] = ternary_latent(t, st, dtype, groups, dim)
        else:
            sd[ours] = (t.float() * Q._expand_group_scale(st, t.shape, dim)).to(dtype)
        if cfg.quant != "fp":
            sd[base + ".quant_lambda"] = torch.tensor(1.0)
    return assemble_model(cfg, sd, frozen, str(f.path), GGUFFormatError)


# =============================================================================================
# save_gguf
# =============================================================================================


def _f16_scale(s: torch.Tensor, name: str) -> np.float32:
    """s rounded to f16 (what a TQ block's ``d`` holds), as float32; refuses what f16 cannot hold."""
    sf = float(s.reshape(-1)[0])
    s16 = np.float32(np.float16(sf))
    if not (math.isfinite(sf) and sf > 0) or not np.isfinite(s16) or s16 == 0:
        raise ValueError(f"{name}: scale {sf!r} cannot be stored as an f16 TQ block scale")
    if s16 < np.float32(6.103515625e-05):  # f16 subnormal: fewer than 11 significant bits
        warnings.warn(f"{name}: scale {sf:.3g} is below f16's normal range; stored as {float(s16):.6g} "
                      f"(relative error {abs(float(s16) - sf) / sf:.2g})", stacklevel=4)
    return s16


def _encode_float(w: np.ndarray, kind: str, name: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """(array, raw_dtype) for GGUFWriter.add_tensor; ``kind`` in f32 / f16 / q8_0."""
    if kind == "f32":
        return np.ascontiguousarray(w, dtype=np.float32), None
    if kind == "f16":
        if np.abs(w).max(initial=0.0) > 65504.0:
            raise ValueError(f"{name}: values beyond f16's range (±65504); use head_type='f32'")
        return np.ascontiguousarray(w, dtype=np.float16), None
    if w.shape[-1] % 32:
        raise ValueError(f"{name}: Q8_0 needs rows that are a multiple of 32 values, got {w.shape[-1]}")
    qt = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qt), qt


def _encode_ternary(t: torch.Tensor, s16: np.float32, qtype: Any, name: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """TQ1_0/TQ2_0 bytes of s₁₆·T, checked: every block's stored d is s₁₆ (or 0 for an all-zero
    block), so dequantisation gives s₁₆·T exactly."""
    w = t.numpy().astype(np.float32) * s16  # exact: s16 · {-1, 0, 1}
    raw = gguf.quants.quantize(w, qtype)
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    d = raw.reshape(-1, type_size)[:, -2:].copy().view("<f2").astype(np.float32).reshape(-1)  # d ends each block
    nonzero = np.abs(w).reshape(-1, QK_K).max(axis=1) != 0
    if not (np.all(d[nonzero] == s16) and np.all(d[~nonzero] == 0)):  # pragma: no cover - gguf changed
        raise RuntimeError(f"{name}: gguf's {qtype.name} quantiser did not store the scale exactly")
    return raw, qtype


def _encode_grouped(t: torch.Tensor, s: torch.Tensor, dim: str, qtype: Any, name: str,
                    gguf: Any) -> tuple[tuple[np.ndarray, Any], str | None]:
    """A weight with G scales along ``dim`` (output rows or input columns): TQ bytes whose every
    256-block's d is its group's s₁₆ — exact when each block lies inside one group (rows of 256
    for row groups; K/G a multiple of 256 for column groups) — else F16 s₁₆·T (exact too; the
    reason is returned for the warning).  Checked like :func:`_encode_ternary`."""
    n, k = t.shape
    s16 = torch.tensor([float(_f16_scale(v.reshape(1), name)) for v in s.reshape(-1)], dtype=torch.float32)
    per = Q._expand_group_scale(s16, t.shape, dim).expand(n, k).numpy()  # (N, K) s₁₆ of each weight
    w = t.numpy().astype(np.float32) * per  # exact: f16 values · {-1, 0, 1}
    groups = s16.numel()
    if k % QK_K:
        why = f"rows not a multiple of {QK_K}"
    elif dim == "in" and (k // groups) % QK_K:
        why = f"in_features/G = {k // groups} not a multiple of {QK_K}: a block would span two column groups"
    else:
        raw = gguf.quants.quantize(w, qtype)
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        d = raw.reshape(-1, type_size)[:, -2:].copy().view("<f2").astype(np.float32).reshape(-1)
        want = per.reshape(-1, QK_K)[:, 0]  # each block's group scale
        nonzero = np.abs(w).reshape(-1, QK_K).max(axis=1) != 0
        if not (np.all(d[nonzero] == want[nonzero]) and np.all(d[~nonzero] == 0)):  # pragma: no cover
            raise RuntimeError(f"{name}: gguf's {qtype.name} quantiser did not store the group scales exactly")
        return (raw, qtype), None
    return (w.astype(np.float16), None), why


def gguf_architecture(bitlm_arch: str, ternary_type: str) -> str:
    """The GGUF ``general.architecture`` bitlm writes for a model of ``bitlm_arch`` with
    projections of ``ternary_type``: llama.cpp's ``bitnet`` for TQ types and SiLU models (the
    runtimes' SiLU BitNet graph); for ReLU² models, bitnet.cpp's ``bitnet-b1.58`` (the name of
    the published 2B4T file) with I2_S, ik_llama.cpp's ``bitnet-25`` (the name every ik_llama.cpp
    with 2B4T support knows) with the IQ types."""
    if ternary_type in ("tq2_0", "tq1_0") or _ARCH_TO_ACTIVATION.get(bitlm_arch) != "relu2":
        return ARCH
    return "bitnet-b1.58" if ternary_type == "i2_s" else "bitnet-25"


def _encode_bn(t: torch.Tensor, s: torch.Tensor, type_id: int, name: str) -> tuple[Any, Any]:
    """((bytes, numpy shape), type id) of s·T in a bitnet.cpp / ik_llama.cpp type, or
    (F16 s·T, None) when the shape does not fit the type (exact either way)."""
    sf = np.float32(s.reshape(-1)[0].float())
    if not (np.isfinite(sf) and sf > 0):
        raise ValueError(f"{name}: scale {float(sf)!r} cannot be stored")
    tn = t.numpy().astype(np.int8)
    if GT.shape_problem(type_id, (tn.shape[1], tn.shape[0])):  # F16 holds s₁₆·T exactly
        return (tn.astype(np.float32) * _f16_scale(s, name)).astype(np.float16), None
    if type_id == GT.IQ1_BN:
        sf = _f16_scale(s, name)  # the row scale is f16: what ik_llama.cpp computes with
    raw = GT.encode(type_id, tn, sf)
    return (raw, tn.shape), type_id


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[Any, dict[str, Any] | None]:
    """(bitlm Tokenizer, GGUF tokenizer metadata or None when it is not a byte-level BPE)."""
    from ..data import Tokenizer, load_tokenizer

    if isinstance(tokenizer, (str, Path)):
        tok = load_tokenizer(tokenizer)
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab"):  # a tokenizers.Tokenizer
        tok = Tokenizer(tokenizer)
    else:
        raise TypeError(f"tokenizer must be a bitlm Tokenizer, a tokenizers.Tokenizer or a path, "
                        f"got {type(tokenizer).__name__}")
    backend = tok.backend
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        warnings.warn(f"tokenizer model {model.get('type')!r} is not a BPE: the GGUF gets no vocabulary "
                      "(llama.cpp tokenizer 'none'); the exact tokenizer is still written beside it", stacklevel=3)
        return tok, None
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if pre is None:
        warnings.warn("pre-tokenizer is neither GPT-2's byte-level split nor LLaMA 3's: written as 'gpt-2', "
                      "so llama.cpp will split text differently (token ids are unaffected)", stacklevel=3)
        pre = "gpt-2"
    vocab = backend.get_vocab(with_added_tokens=True)  # token → id
    n = max(vocab.values()) + 1
    if n > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {n - 1} but the model's vocabulary is {vocab_size}")
    added = backend.get_added_tokens_decoder()  # id → AddedToken
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_TT_UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (_TT_CONTROL if added[i].special else _TT_USER_DEFINED) if i in added else _TT_NORMAL
    if len(set(tokens)) != len(tokens):
        raise ValueError("the tokenizer's vocabulary clashes with bitlm's [PADn] filler names")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokens": tokens, "types": types, "merges": merges, "bos": tok.bos_id, "eos": tok.eos_id,
            "pad": tok.pad_id, "pre": pre}
    return tok, meta


def _pre_tokenizer_name(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a tokenizers pre-tokenizer spec: "gpt-2" (bitlm's ByteLevel with the
    GPT-2 regex), "llama-bpe" (LLaMA 3 / 2B4T: Split on their regex, then ByteLevel), else None."""
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if parts and len(parts) == 2:
        split, byte_level = parts
        if (split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") == _LLAMA3_REGEX
                and split.get("behavior") == "Isolated" and not split.get("invert")
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
                and not byte_level.get("add_prefix_space")):
            return "llama-bpe"
    return None


def write_hparams(w: Any, cfg: ModelConfig) -> None:
    """The model-shape keys of a llama.cpp-family GGUF (``<arch>.context_length`` ... ``.layer_norm_rms_eps``)
    for ``cfg``, on a ``gguf.GGUFWriter`` opened with the architecture name."""
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)  # full rotary, NEOX pairing (no q/k permutation)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)


def write_vocab(w: Any, vocab: dict[str, Any], pre: str, add_bos: bool = False) -> None:
    """A byte-level BPE vocabulary as llama.cpp reads it (``tokenizer.ggml.*``, model "gpt2"):
    ``vocab`` holds tokens, types, merges, bos, eos and optionally pad."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab.get("pad") is not None:
        w.add_pad_token_id(vocab["pad"])
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)


def save_gguf(
    model: BitNetModel,
    path: str | Path,
    *,
    ternary_type: str = "tq2_0",
    tokenizer: Any = None,
    head_type: str = "f16",
    name: str | None = None,
) -> Path:
    """Write ``model`` as a GGUF file for llama.cpp, bitnet.cpp or ik_llama.cpp; returns its path.

    ``ternary_type`` picks the projections' type and with it the runtime and architecture
    (:func:`gguf_architecture`): "tq2_0" (2.06 bits/weight) or "tq1_0" (1.69) → mainline
    llama.cpp's ``bitnet``; "i2_s" (2.0, one float32 scale per tensor) → bitnet.cpp;
    "iq2_bn" / "iq2_bn_r4" (2.0, a float32 scale per row) or "iq1_bn" (1.625, an f16 scale per
    row) → ik_llama.cpp.  ReLU² models (bitnet-2b4t) go to the runtimes' ReLU² architecture
    (``bitnet-b1.58`` for I2_S, ``bitnet-25`` for the IQ types), SiLU models to ``bitnet``.
    ``head_type``: storage of ``token_embd`` (and ``output`` when untied): "f16" (default, as
    llama.cpp's converter), "f32" (exact) or "q8_0".  ``tokenizer``: see the module docstring;
    written into the GGUF and as ``<name>.tokenizer.json`` beside it.  Untied models get an
    ``output.weight`` that bitlm reads but mainline llama.cpp refuses (its bitnet graph always
    uses ``token_embd`` as the head), with a warning.  Only ``bitnet-b1.58`` and
    ``bitnet-2b4t`` models with ternary (or binary) projections, per-token int8 activations and
    one scale per tensor can be written.
    """
    gguf = _gguf()
    cfg = model.config
    require_bitnet_graph(cfg, "GGUF (llama.cpp bitnet)")
    path = Path(path)
    if ternary_type not in TERNARY_TYPES:
        raise ValueError(f"ternary_type must be one of {', '.join(TERNARY_TYPES)}, got {ternary_type!r}")
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    if cfg.arch not in _ARCH_TO_ACTIVATION:
        raise ValueError(f"arch {cfg.arch!r} has no llama.cpp equivalent (LayerNorm/GELU graph); only "
                         f"{', '.join(_ARCH_TO_ACTIVATION)} can be written as GGUF")
    if cfg.quant == "fp":
        raise ValueError("an fp model has no ternary weights; GGUF export writes ternary projections")
    if cfg.rope_scaling:  # llama.cpp would need a rope_freqs tensor; bitlm writes plain RoPE only
        raise ValueError(f"rope_scaling {cfg.rope_scaling.get('rope_type')!r} (scaled RoPE frequencies) cannot be "
                         "written as GGUF by bitlm; only plain RoPE models can")
    qtype = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}.get(ternary_type)
    bn_type = GT.TERNARY_TYPE_IDS.get(ternary_type)
    arch = gguf_architecture(cfg.arch, ternary_type)
    if not cfg.tie_embeddings and arch == ARCH:
        warnings.warn(f"untied model: output.weight is written, which bitlm reads but mainline llama.cpp "
                      f"refuses (its {ARCH!r} graph, like ik_llama.cpp's, uses token_embd as the output head)",
                      stacklevel=2)

    tok, vocab = (None, None) if tokenizer is None else _vocab(tokenizer, cfg.vocab_size)

    sd = model.state_dict()
    tensors: list[tuple[str, np.ndarray, Any]] = []
    fallback: list[str] = []
    warm: list[str] = []
    exact: dict[str, list[float]] = {}
    for ours, theirs in tensor_name_map(cfg).items():
        base = ours.removesuffix(".weight")
        if base.endswith(tuple(PROJECTIONS)):
            m = model.get_submodule(base)
            groups = getattr(m, "weight_groups", 1)
            if groups != 1 and bn_type is not None:
                raise ValueError(f"{base}: {groups} weight scale groups; GGUF {ternary_type.upper()} as bitlm writes it "
                                 "holds one scale per tensor, so the model cannot be written exactly (write tq2_0 / "
                                 "tq1_0, whose 256-weight blocks hold group scales, or export with requantize=True)")
            _export_check(base, m, weight_groups_ok=True)
            lam = getattr(m, "quant_lambda", None)
            if lam is not None and float(lam) != 1.0:
                warm.append(base)
            t, s = _ternary_of(base, m, weight_groups_ok=True)
            exact[theirs] = [float(v) for v in s.reshape(-1).float()]
            if groups != 1:
                enc, why = _encode_grouped(t, s, m.weight_group_dim, qtype, base, gguf)
                tensors.append((theirs, *enc))
                if why:
                    fallback.append(f"{theirs} ({why})")
                continue
            if bn_type is not None:
                tensors.append((theirs, *_encode_bn(t, s, bn_type, base)))
                if tensors[-1][2] is None:
                    fallback.append(theirs)
                continue
            s16 = _f16_scale(s, base)
            if t.shape[1] % QK_K == 0:
                tensors.append((theirs, *_encode_ternary(t, s16, qtype, base, gguf)))
            else:  # TQ needs rows of 256: F16 holds s16·T exactly
                fallback.append(theirs)
                tensors.append((theirs, (t.numpy().astype(np.float32) * s16).astype(np.float16), None))
            continue
        w = sd[ours].detach().float().cpu().numpy()
        if not np.isfinite(w).all():
            raise ValueError(f"{ours}: contains inf or nan")
        if w.ndim == 1:  # norms: F32, as llama.cpp's converter writes them
            tensors.append((theirs, np.ascontiguousarray(w, dtype=np.float32), None))
        else:
            tensors.append((theirs, *_encode_float(w, head_type, ours, gguf)))
    if fallback:
        need = {None: f"rows not a multiple of {QK_K}", GT.I2_S: f"rows not a multiple of {GT.I2S_BLOCK}",
                GT.IQ2_BN_R4: f"rows not a multiple of {GT.BN_BLOCK} or a row count not a multiple of 4"
                }.get(bn_type, f"rows not a multiple of {GT.BN_BLOCK}")
        warnings.warn(f"{len(fallback)} projections (first: {fallback[0]}) do not fit {ternary_type.upper()} "
                      f"({need}); written as F16 s·T (exact, but without the runtime's ternary kernels)",
                      stacklevel=2)
    if warm:
        warnings.warn(f"{len(warm)} projections (first: {warm[0]}) have quant_lambda < 1 (warm-up not finished); "
                      "the saved model is fully quantised", stacklevel=2)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(name or f"bitlm {cfg.arch}")
        w.add_file_type(_FILE_TYPE[ternary_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(w, cfg)
        # llama.cpp's <arch>.hidden_activation; the ReLU² runtimes' graphs hard-code it and ignore the key
        w.add_string(f"{arch}.hidden_activation", _ARCH_TO_ACTIVATION[cfg.arch])
        if arch == ARCH:
            w.add_string(LEGACY_ACTIVATION_KEY, _ARCH_TO_ACTIVATION[cfg.arch])  # read by bitlm < this key
        w.add_array(NAMES_KEY, list(exact))
        if cfg.weight_groups == 1:
            w.add_array(SCALES_KEY, [v[0] for v in exact.values()])  # python floats → GGUF float32 (exact)
        else:  # G scales per tensor; no SCALES_KEY, so readers without groups refuse the file
            w.add_uint32(GROUPS_KEY, cfg.weight_groups)
            w.add_string(GROUP_DIM_KEY, cfg.weight_group_dim)
            w.add_array(GROUP_SCALES_KEY, [x for v in exact.values() for x in v])
        if vocab is None:
            w.add_tokenizer_model("none")  # llama.cpp then runs on token ids only
        else:
            # add_bos as the tokenizer does (bitlm's: never)
            write_vocab(w, vocab, vocab["pre"], add_bos=bool(getattr(tok, "add_bos", False)))
        for tname, arr, raw_dtype in tensors:
            if raw_dtype in GT.TYPE_NAMES:  # unknown to gguf: bytes (as int8, which it does not reinterpret)
                w.add_tensor(tname, arr[0].view(np.int8), raw_shape=arr[1], raw_dtype=raw_dtype)
            else:
                w.add_tensor(tname, arr, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    side = tokenizer_sidecar(path)
    if tok is not None:
        text = tok.backend.to_str(pretty=True)
        atomic_write_text(side, text)
    elif side.exists():
        warnings.warn(f"{side}: left in place from before; it may not belong to this model", stacklevel=2)
    return path


# =============================================================================================
# Tokenizer from GGUF metadata
# =============================================================================================


def _attached_tokenizer(path: Path, meta: dict[str, Any]) -> Any:
    side = tokenizer_sidecar(path)
    if side.is_file():
        from ..data import load_tokenizer

        try:
            return load_tokenizer(side)
        except ValueError as e:
            warnings.warn(f"{side}: unreadable ({e}); using the GGUF vocabulary", stacklevel=3)
    try:
        return _tokenizer_from_metadata(path, meta)
    except (ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: cannot rebuild the tokenizer from the GGUF vocabulary ({e})", stacklevel=3)
        return None


def gguf_tokenizer(path: str | Path) -> Any:
    """A ``bitlm.data.Tokenizer`` rebuilt from a GGUF's ``gpt2`` BPE vocabulary (tokens, types,
    merges, bos/eos/pad ids), or None when the file has none.  Pre-tokenizers ``gpt-2`` (bitlm's)
    and ``llama-bpe`` (LLaMA 3 / 2B4T) are reproduced; others fall back to GPT-2's with a warning."""
    with read_gguf(path) as f:
        return _tokenizer_from_metadata(f.path, f.metadata)


def _tokenizer_from_metadata(path: Path, meta: dict[str, Any]) -> Any:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        return None
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..data import Tokenizer

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type")
    types = [_TT_NORMAL] * len(tokens) if types is None else [int(x) for x in types]
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    merges = []
    for m in meta.get("tokenizer.ggml.merges", []):
        i = m.find(" ", 1)  # as llama.cpp splits: the first piece may itself be a space
        if i < 0:
            raise ValueError(f"malformed merge {m!r}")
        merges.append((m[:i], m[i + 1 :]))
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != _TT_UNUSED}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    pre = meta.get("tokenizer.ggml.pre")
    if pre is None:  # Microsoft's 2B4T files carry LLaMA 3's vocabulary without naming its pre-tokenizer
        pre = "llama-bpe" if "<|begin_of_text|>" in vocab else "gpt-2"
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        if pre not in ("gpt-2", "gpt2"):
            warnings.warn(f"{path}: pre-tokenizer {pre!r} is approximated by GPT-2's split regex", stacklevel=4)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, ty in enumerate(types) if ty == _TT_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, ty in enumerate(types) if ty == _TT_USER_DEFINED])

    def tok_at(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return Tokenizer(backend, tok_at("tokenizer.ggml.eos_token_id"), tok_at("tokenizer.ggml.bos_token_id"),
                     tok_at("tokenizer.ggml.padding_token_id"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", pre in ("llama-bpe", "llama3", "llama-v3"))))
