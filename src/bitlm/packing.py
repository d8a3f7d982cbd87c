"""Packed weight formats: named, versioned, with their bits per weight — and their pure-torch
pack / unpack, which are the reference definition of every byte.

A quantised weight is ``W ≈ s · T`` (``bitlm.quant``): ``T`` is an int8 (N, K) matrix over the
format's alphabet ({-1, 0, +1} ternary, {-1, +1} binary), N = out_features, K = in_features,
and ``s`` has one float32 per weight group (groups split N).  A format turns ``T`` into bytes:
(column groups, which split K, are stored as K-slices: see "K-slices" below)

======  =======  ======  ===========================================================  ========
name    version  bpw     layout                                                        kernels
======  =======  ======  ===========================================================  ========
``i2``  1        2.0     16-row tiles x 16-k chunks, 2-bit codes, VNNI-friendly         native
``t1``  1        1.6     16-row tiles x 20-k chunks, 5 trits per byte (base-3 fixed pt) native
``b1``  1        1.0     16-row tiles x 32-k chunks, 1 bit per weight                   native
``hf``  1        2.0     Hugging Face BitNet: uint8 [ceil(N/4), K], 4 rows per byte     torch
======  =======  ======  ===========================================================  ========

Common geometry of the native formats (i2, t1, b1) — chosen for the kernels in ``csrc/``:
rows are grouped in *tiles* of 16 (tile t = rows 16t .. 16t+15), K is cut into *chunks* of
``block_k`` columns (16, 20, 32), and one chunk of one tile is exactly 64 bytes — one zmm
register.  ``data`` has shape ``(ceil(N/16), ceil(K/block_k) * 64)``: row t of ``data`` is
tile t, its bytes ``64c .. 64c+63`` are chunk c.  Inside a chunk, bytes ``4r .. 4r+3`` (one
32-bit lane) belong to tile row r, so after unpacking, every lane of a vpdpbusd accumulator is
one output row and a single broadcast of 4 activations feeds all 16 rows.  N and K are padded
up to whole tiles and chunks; padding is a zero weight (code 1) for i2/t1 and bit 0 for b1, and
the kernels pad activations with zeros, so padding never changes a result.  ``unpack`` ignores
padding; ``pack`` always writes it as stated, so packing is deterministic.

Per-format byte layouts (n = 16t + r is the output row, k the input column, code = w + 1):

* **i2** (``block_k`` = 16): byte ``64c + 4r + b`` of tile t holds, in bits ``2q .. 2q+1``
  (q = 0..3), ``code(n, k = 16c + 4q + b)``.  So one byte carries k = b, b+4, b+8, b+12 of the
  chunk and one 32-bit lane carries 16 consecutive k of one row.  Code 3 is invalid.
  Decoding one quad q for all 16 rows is one shift and one AND: ``(dword >> 2q) & 0x03030303``.
* **t1** (``block_k`` = 20): byte ``64c + 4r + b`` holds the 5 codes ``d_i = code(n, k = 20c +
  4i + b)``, i = 0..4, as ``v = Σ d_i · 3^(4-i)`` (d_0 most significant) stored as the base-3
  fixed-point byte ``ceil(256 · v / 243)`` (0..255; only those 243 values are valid).  Decoding
  needs no table and no division: ``m_0 = byte``, ``d_i = (3 · m_i) >> 8``,
  ``m_{i+1} = (3 · m_i) & 255`` — digit i is the integer part of 3 x the remaining fraction
  (the ceil makes the truncation error too small to ever carry into a digit).  In SIMD,
  ``(3m) >> 8 = [m ≥ 86] + [m ≥ 171]`` and ``3m mod 256`` is two byte adds.  K = 6912 pads to
  6920 (0.1 %).
* **b1** (``block_k`` = 32): the chunk is 8 little-endian uint64 words; word q (bytes
  ``64c + 8q .. 64c + 8q + 7``) has bit ``4r + b`` = 1 iff ``w(n, k = 32c + 4q + b) = +1``
  (0 means -1).  Equivalently byte ``64c + 8q + j`` holds rows 2j (bits 0-3, b = 0..3) and
  2j+1 (bits 4-7).  A word loads straight into an AVX-512 mask register, whose bit i selects
  byte lane i = 4r + b.  Padding bits are 0.
* **hf** (reference only; the Hugging Face ``BitLinear`` / ``AutoBitLinear`` checkpoint
  layout): ``data`` is uint8 ``[R, K]`` with R = ceil(N/4); byte ``[r, k]`` holds, in bits
  ``2i .. 2i+1`` (i = 0..3), ``code(n = i·R + r, k)`` — a row-block interleave along N, not
  adjacent rows.  Rows ≥ N read as code 0 (as Hugging Face's ``pack_weights`` leaves them).
  Its ``weight_scale`` convention is converted in ``bitlm.io``, never here: a ``PackedWeight``
  always stores s = mean|W| (multiply).

**K-slices** (input-column weight groups, per-group activation scales; 2310.11453 Eq. 13-15): a
weight with ``k_groups`` = G > 1 is G independent (N, K/G) weights, slice j holding input columns
``j·K/G .. (j+1)·K/G - 1``, each packed (and padded) on its own — so any K/G works with every
format, no chunk has to straddle two slices.  ``data`` is the G packed slices stacked along the
tile axis, shape ``(G · ceil(N/16), bytes(K/G))``; ``scale`` has G · groups values, slice j's
row-group scales at ``j·groups .. (j+1)·groups - 1``.  The kernels run one GEMM per slice and sum
the G float results in slice order (``bitlm.kernels.reference.matmul``).

The kernels in ``csrc/bitlm_kernels.h`` compute ``Σ_k x·T`` for i2/t1/b1 directly on these
bytes; ``hf`` weights are converted with :meth:`PackedWeight.to_format` (pure torch, exact).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "PackingFormat",
    "PackedWeight",
    "FORMATS",
    "TILE_N",
    "get_format",
    "pack_tensor",
    "unpack_tensor",
    "pack_weight",
    "packed_shape",
    "slice_scales",
    "quantize_and_pack",
    "HEAD_BITS",
    "pack_head",
    "unpack_head",
]

TILE_N = 16  # rows per tile of the native formats
CHUNK_BYTES = 64  # bytes per (tile, chunk): one 512-bit register


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_ints(t: torch.Tensor, alphabet: tuple[int, ...], fmt: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fmt}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{fmt}: expected a 2-D (N, K) weight, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{fmt}: expected an integer tensor (int8 values in {alphabet}), got {t.dtype}")
    if t.numel():
        ok = torch.zeros_like(t, dtype=torch.bool)
        for v in alphabet:
            ok |= t == v
        if not bool(ok.all()):
            bad = t[~ok].unique()[:8].tolist()
            raise ValueError(f"{fmt}: weight values must be in {alphabet}; found {bad}")


def _check_data(data: torch.Tensor, shape: tuple[int, int], fmt: str) -> None:
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise TypeError(f"{fmt}: packed data must be a uint8 tensor, got {got}")
    if tuple(data.shape) != shape:
        raise ValueError(f"{fmt}: packed data has shape {tuple(data.shape)}, expected {shape} for this (N, K)")


def _pad_codes(codes: torch.Tensor, n_pad: int, k_pad: int, fill: int) -> torch.Tensor:
    n, k = codes.shape
    if (n, k) == (n_pad, k_pad):
        return codes
    out = torch.full((n_pad, k_pad), fill, dtype=codes.dtype)
    out[:n, :k] = codes
    return out


# ---------------------------------------------------------------------------------------------
# i2: 2-bit codes, tile 16 x chunk 16
# ---------------------------------------------------------------------------------------------

I2_BLOCK_K = 16


def _i2_shape(n: int, k: int) -> tuple[int, int]:
    return (_ceil_div(n, TILE_N), _ceil_div(k, I2_BLOCK_K) * CHUNK_BYTES)


def _i2_pack(t: torch.Tensor) -> torch.Tensor:
    _check_ints(t, (-1, 0, 1), "i2")
    n, k = t.shape
    tiles, nbytes = _i2_shape(n, k)
    chunks = nbytes // CHUNK_BYTES
    codes = _pad_codes((t.to(torch.int16) + 1), tiles * TILE_N, chunks * I2_BLOCK_K, fill=1)
    c = codes.reshape(tiles, TILE_N, chunks, 4, 4)  # (tile, r, chunk, q, b): k = 16c + 4q + b
    c = c.permute(0, 2, 1, 4, 3)  # (tile, chunk, r, b, q)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16)
    byte = (c << shifts).sum(dim=-1)  # (tile, chunk, r, b): distinct bits, so sum == OR
    return byte.to(torch.uint8).reshape(tiles, nbytes).contiguous()


def _i2_unpack(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tiles, nbytes = _i2_shape(n, k)
    _check_data(data, (tiles, nbytes), "i2")
    chunks = nbytes // CHUNK_BYTES
    b = data.to(torch.int16).reshape(tiles, chunks, TILE_N, 4, 1)  # (tile, chunk, r, b, 1)
    codes = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int16)) & 3  # (tile, chunk, r, b, q)
    codes = codes.permute(0, 2, 1, 4, 3).reshape(tiles * TILE_N, chunks * I2_BLOCK_K)[:n, :k]
    if bool((codes == 3).any()):
        raise ValueError("i2: packed data contains the invalid 2-bit code 3")
    return (codes - 1).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# t1: 5 trits per byte (base-3 fixed point), tile 16 x chunk 20
# ---------------------------------------------------------------------------------------------

T1_BLOCK_K = 20
_T1_POW = torch.tensor([81, 27, 9, 3, 1], dtype=torch.int32)  # d_0 is the most significant digit


def _t1_shape(n: int, k: int) -> tuple[int, int]:
    return (_ceil_div(n, TILE_N), _ceil_div(k, T1_BLOCK_K) * CHUNK_BYTES)


def _t1_encode(digits: torch.Tensor) -> torch.Tensor:
    """(..., 5) codes in {0,1,2} -> int32 byte values ceil(256 v / 243)."""
    v = (digits.to(torch.int32) * _T1_POW).sum(dim=-1)
    return (v * 256 + 242) // 243


def _t1_decode(byte: torch.Tensor) -> torch.Tensor:
    """int32 byte values -> (..., 5) digits by the multiply-by-3 rule (valid or not)."""
    m = byte.to(torch.int32)
    out = []
    for _ in range(5):
        m3 = m * 3
        out.append(m3 >> 8)
        m = m3 & 255
    return torch.stack(out, dim=-1)


def _t1_pack(t: torch.Tensor) -> torch.Tensor:
    _check_ints(t, (-1, 0, 1), "t1")
    n, k = t.shape
    tiles, nbytes = _t1_shape(n, k)
    chunks = nbytes // CHUNK_BYTES
    codes = _pad_codes(t.to(torch.int32) + 1, tiles * TILE_N, chunks * T1_BLOCK_K, fill=1)
    c = codes.reshape(tiles, TILE_N, chunks, 5, 4)  # (tile, r, chunk, i, b): k = 20c + 4i + b
    c = c.permute(0, 2, 1, 4, 3)  # (tile, chunk, r, b, i)
    return _t1_encode(c).to(torch.uint8).reshape(tiles, nbytes).contiguous()


def _t1_unpack(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tiles, nbytes = _t1_shape(n, k)
    _check_data(data, (tiles, nbytes), "t1")
    chunks = nbytes // CHUNK_BYTES
    b = data.to(torch.int32)
    digits = _t1_decode(b)  # (tiles, nbytes, 5)
    bad = _t1_encode(digits) != b
    if bool(bad.any()):
        vals = data[bad].unique()[:8].tolist()
        raise ValueError(f"t1: packed data contains bytes that are not base-3 codes (e.g. {vals})")
    d = digits.reshape(tiles, chunks, TILE_N, 4, 5)  # (tile, chunk, r, b, i)
    d = d.permute(0, 2, 1, 4, 3).reshape(tiles * TILE_N, chunks * T1_BLOCK_K)[:n, :k]
    return (d - 1).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# b1: 1 bit per weight, tile 16 x chunk 32
# ---------------------------------------------------------------------------------------------

B1_BLOCK_K = 32
_BITS8 = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.int32)


def _b1_shape(n: int, k: int) -> tuple[int, int]:
    return (_ceil_div(n, TILE_N), _ceil_div(k, B1_BLOCK_K) * CHUNK_BYTES)


def _b1_pack(t: torch.Tensor) -> torch.Tensor:
    _check_ints(t, (-1, 1), "b1")
    n, k = t.shape
    tiles, nbytes = _b1_shape(n, k)
    chunks = nbytes // CHUNK_BYTES
    bits = _pad_codes((t > 0).to(torch.int32), tiles * TILE_N, chunks * B1_BLOCK_K, fill=0)
    c = bits.reshape(tiles, TILE_N, chunks, 8, 4)  # (tile, r, chunk, q, b): k = 32c + 4q + b
    c = c.permute(0, 2, 3, 1, 4).reshape(tiles, chunks, 8, 8, 8)  # (tile, chunk, q, j, bit): 4r+b = 8j+bit
    byte = (c * _BITS8).sum(dim=-1)  # little-endian bit order inside each byte
    return byte.to(torch.uint8).reshape(tiles, nbytes).contiguous()


def _b1_unpack(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    tiles, nbytes = _b1_shape(n, k)
    _check_data(data, (tiles, nbytes), "b1")
    chunks = nbytes // CHUNK_BYTES
    b = data.to(torch.int32).reshape(tiles, chunks, 8, 8, 1)  # (tile, chunk, q, j, 1)
    bits = (b & _BITS8) != 0  # (tile, chunk, q, j, bit)
    bits = bits.reshape(tiles, chunks, 8, TILE_N, 4).permute(0, 3, 1, 2, 4)  # (tile, r, chunk, q, b)
    bits = bits.reshape(tiles * TILE_N, chunks * B1_BLOCK_K)[:n, :k]
    return torch.where(bits, 1, -1).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# hf: Hugging Face BitNet packing (rows r, r+R, r+2R, r+3R in one byte)
# ---------------------------------------------------------------------------------------------


def _hf_shape(n: int, k: int) -> tuple[int, int]:
    return (_ceil_div(n, 4), k)


def _hf_pack(t: torch.Tensor) -> torch.Tensor:
    _check_ints(t, (-1, 0, 1), "hf")
    n, k = t.shape
    r = _ceil_div(n, 4)
    codes = _pad_codes(t.to(torch.int16) + 1, 4 * r, k, fill=0)  # HF leaves missing rows as 0 bits
    c = codes.reshape(4, r, k)  # (i, r, k): row i*R + r
    byte = (c << torch.tensor([0, 2, 4, 6], dtype=torch.int16).reshape(4, 1, 1)).sum(dim=0)
    return byte.to(torch.uint8).contiguous()


def _hf_unpack(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    r = _ceil_div(n, 4)
    _check_data(data, (r, k), "hf")
    b = data.to(torch.int16).unsqueeze(0)  # (1, R, K)
    codes = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int16).reshape(4, 1, 1)) & 3  # (i, R, K)
    codes = codes.reshape(4 * r, k)[:n]
    if bool((codes == 3).any()):
        raise ValueError("hf: packed data contains the invalid 2-bit code 3")
    return (codes - 1).to(torch.int8)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackingFormat:
    """One named, versioned packing format.  ``pack(T) -> uint8``; ``unpack(data, N, K) -> int8``."""

    name: str
    version: int
    bits_per_weight: float  # nominal, without padding
    alphabet: tuple[int, ...]  # the integer values T may take
    block_k: int  # columns per chunk (1 for hf: no blocking along K)
    native_id: int | None  # BITLM_FMT_* id of csrc/bitlm_kernels.h, None = no native kernel
    packed_shape: Callable[[int, int], tuple[int, int]] = field(repr=False)
    pack: Callable[[torch.Tensor], torch.Tensor] = field(repr=False)
    unpack: Callable[[torch.Tensor, int, int], torch.Tensor] = field(repr=False)
    description: str = ""

    @property
    def ternary(self) -> bool:
        return 0 in self.alphabet


FORMATS: dict[str, PackingFormat] = {
    f.name: f
    for f in (
        PackingFormat("i2", 1, 2.0, (-1, 0, 1), I2_BLOCK_K, 1, _i2_shape, _i2_pack, _i2_unpack,
                      "ternary, 2-bit codes w+1, 16-row tiles x 16-k chunks"),
        PackingFormat("t1", 1, 1.6, (-1, 0, 1), T1_BLOCK_K, 2, _t1_shape, _t1_pack, _t1_unpack,
                      "ternary, 5 trits/byte as base-3 fixed point, 16-row tiles x 20-k chunks"),
        PackingFormat("b1", 1, 1.0, (-1, 1), B1_BLOCK_K, 3, _b1_shape, _b1_pack, _b1_unpack,
                      "binary, 1 bit/weight (1 = +1), 16-row tiles x 32-k chunks"),
        PackingFormat("hf", 1, 2.0, (-1, 0, 1), 1, None, _hf_shape, _hf_pack, _hf_unpack,
                      "Hugging Face BitNet uint8 [ceil(N/4), K], rows r + i*R at bits 2i"),
    )
}


def get_format(name: str | PackingFormat) -> PackingFormat:
    if isinstance(name, PackingFormat):
        return name
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown packing format {name!r}; known: {', '.join(FORMATS)}") from None


def pack_tensor(t: torch.Tensor, format: str) -> torch.Tensor:
    """Pack an integer (N, K) matrix over the format's alphabet into its uint8 layout."""
    return get_format(format).pack(t.detach().cpu())


def unpack_tensor(data: torch.Tensor, format: str, n: int, k: int) -> torch.Tensor:
    """The exact inverse of :func:`pack_tensor`: int8 (N, K).  Raises on invalid bytes."""
    return get_format(format).unpack(data.detach().cpu(), int(n), int(k))


# ---------------------------------------------------------------------------------------------
# PackedWeight
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """A packed weight ``W ≈ s_g · T``: format, version, shape (N = out, K = in), bytes, scales.

    ``scale`` is float32 of shape ``(k_groups · groups,)``; row group g covers output rows
    ``g·N/groups .. (g+1)·N/groups - 1`` (``bitlm.quant`` convention: s = mean|W|, multiply).
    ``k_groups`` > 1 splits K into independently packed slices, each with its own ``groups``
    row-group scales (module docstring, "K-slices"); :meth:`slices` gives them as weights.
    """

    format: str
    version: int
    N: int
    K: int
    data: torch.Tensor
    scale: torch.Tensor
    groups: int = 1
    k_groups: int = 1

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.version != fmt.version:
            raise ValueError(f"{self.format}: packed with version {self.version}, this bitlm reads "
                             f"version {fmt.version}")
        self.N, self.K, self.groups, self.k_groups = int(self.N), int(self.K), int(self.groups), int(self.k_groups)
        if self.N < 1 or self.K < 1:
            raise ValueError(f"PackedWeight needs N, K >= 1, got ({self.N}, {self.K})")
        if self.groups < 1 or self.N % self.groups:
            raise ValueError(f"N={self.N} is not divisible into groups={self.groups}")
        if self.k_groups < 1 or self.K % self.k_groups:
            raise ValueError(f"K={self.K} is not divisible into k_groups={self.k_groups}")
        _check_data(self.data, packed_shape(fmt, self.N, self.K, self.k_groups), self.format)
        if not self.data.is_contiguous():
            self.data = self.data.contiguous()
        scale = torch.as_tensor(self.scale, dtype=torch.float32).reshape(-1)
        if scale.numel() != self.groups * self.k_groups:
            want = f"groups={self.groups}" + (f" x k_groups={self.k_groups}" if self.k_groups > 1 else "")
            raise ValueError(f"scale has {scale.numel()} values, expected {want}")
        self.scale = scale.contiguous()

    @property
    def fmt(self) -> PackingFormat:
        return get_format(self.format)

    @property
    def out_features(self) -> int:
        return self.N

    @property
    def in_features(self) -> int:
        return self.K

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def bits_per_weight(self) -> float:
        """Actual storage cost including padding (the nominal one is ``fmt.bits_per_weight``)."""
        return 8.0 * self.nbytes / (self.N * self.K)

    def slices(self) -> list[PackedWeight]:
        """The K-slices as ungrouped-along-K weights (N, K/k_groups), sharing this weight's memory;
        ``[self]`` when ``k_groups`` == 1."""
        if self.k_groups == 1:
            return [self]
        kk = self.K // self.k_groups
        tiles = self.data.shape[0] // self.k_groups
        return [PackedWeight(self.format, self.version, self.N, kk, self.data[j * tiles:(j + 1) * tiles],
                             self.scale[j * self.groups:(j + 1) * self.groups], self.groups)
                for j in range(self.k_groups)]

    def unpack(self) -> torch.Tensor:
        """T as int8 (N, K)."""
        if self.k_groups > 1:
            return torch.cat([w.unpack() for w in self.slices()], dim=1)
        return self.fmt.unpack(self.data, self.N, self.K)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W = s_g · T as a dense (N, K) tensor."""
        from .quant import dequantize_weight

        if self.k_groups > 1:
            return torch.cat([w.dequantize(dtype) for w in self.slices()], dim=1)
        return dequantize_weight(self.unpack(), self.scale, dtype)

    def to_format(self, format: str) -> PackedWeight:
        """The same weight in another format (exact; binary weights fit any format, ternary
        weights with zeros do not fit ``b1``)."""
        return pack_weight(self.unpack(), self.scale, format, self.groups, self.k_groups)

    def state_dict(self) -> dict[str, Any]:
        d = {"format": self.format, "version": self.version, "N": self.N, "K": self.K,
             "data": self.data, "scale": self.scale, "groups": self.groups}
        if self.k_groups > 1:
            d["k_groups"] = self.k_groups
        return d


def packed_shape(format: str | PackingFormat, n: int, k: int, k_groups: int = 1) -> tuple[int, int]:
    """Shape of the packed bytes of an (n, k) weight cut into ``k_groups`` K-slices."""
    fmt = get_format(format)
    if k_groups == 1:
        return fmt.packed_shape(n, k)
    tiles, nbytes = fmt.packed_shape(n, k // k_groups)
    return (k_groups * tiles, nbytes)


def pack_weight(t: torch.Tensor, scale: torch.Tensor | float, format: str = "i2", groups: int | None = None,
                k_groups: int = 1) -> PackedWeight:
    """Pack integer weights ``T`` (N, K) with their scales into a :class:`PackedWeight`
    (``k_groups`` > 1: K-slices packed one by one, ``scale`` holding k_groups x groups values)."""
    fmt = get_format(format)
    scale_t = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
    g = scale_t.numel() // k_groups if groups is None else int(groups)
    t = t.detach().cpu()
    if k_groups > 1:
        if t.shape[1] % k_groups:
            raise ValueError(f"K={t.shape[1]} is not divisible into k_groups={k_groups}")
        data = torch.cat([fmt.pack(ts.contiguous()) for ts in t.chunk(k_groups, dim=1)])
    else:
        data = fmt.pack(t)
    return PackedWeight(fmt.name, fmt.version, t.shape[0], t.shape[1], data, scale_t, g, k_groups)


def slice_scales(s: torch.Tensor, dim: str, k_groups: int) -> torch.Tensor:
    """Per-group weight scales (``bitlm.quant``: (G,) along ``dim``) → the (k_groups x row groups)
    scale table of a :class:`PackedWeight` with ``k_groups`` K-slices (k_groups a multiple of G
    for ``dim="in"``): output-row groups repeat for every slice, input-column groups give each
    slice its group's scale."""
    s = s.reshape(-1).float()
    if dim == "in":
        if k_groups % s.numel():
            raise ValueError(f"{s.numel()} input-column weight groups do not divide k_groups={k_groups}")
        return s.repeat_interleave(k_groups // s.numel())
    return s.repeat(k_groups)


def quantize_and_pack(w: torch.Tensor, format: str = "i2", groups: int = 1, dim: str = "out") -> PackedWeight:
    """Quantise a float (N, K) weight (absmean ternary for ternary formats, mean-centred sign for
    ``b1``; ``bitlm.quant``) and pack it; ``dim="in"`` groups input columns (K-slices)."""
    from .quant import weight_quantize

    fmt = get_format(format)
    t, s = weight_quantize(w, "b1.58" if fmt.ternary else "b1", groups, dim)
    if dim == "in":
        return pack_weight(t, s, fmt.name, 1, groups)
    return pack_weight(t, s, fmt.name, groups)


# ---------------------------------------------------------------------------------------------
# Low-bit output heads: 6-bit / 4-bit rows with per-group f16 scales
# ---------------------------------------------------------------------------------------------
#
# An output head (vocab x d, read in full every token) stored as symmetric integers with one
# IEEE half scale per (row, group of HEAD_GROUP = 32 columns): W[n, k] ~ w[n, k] * s[n, k // 32],
# w in [-31, 31] (6 bits, code = w + 32) or [-7, 7] (4 bits, code = w + 8).  4.5 / 6.5 bits per
# weight with the scales.  Rows are padded to tiles of 16 and columns to groups of 32 with zero
# weights (zero scales for padding rows).  Byte layout, per tile t and group g, a block of 256
# (4-bit) or 384 (6-bit) bytes; operand o = 0..7 of the block holds k = 32g + 4o + b, b = 0..3:
#
# * low 4 bits of code(row 16t + r, k): byte 64 * (o // 2) + 4r + b, low nibble for even o,
#   high nibble for odd o;
# * 6-bit only, high 2 bits: byte 256 + 64 * (o // 4) + 4r + b, bits 2 * (o % 4) .. + 1.
#
# So one 64-byte piece is 16 rows x 4 k: every lane of a vpdpbusd is one output row, as in the
# ternary formats.  ``scale`` is f16 (tiles, groups, 16), flattened.  The kernel semantics are
# ``bitlm.kernels.reference.dense_lowbit_matmul`` (csrc/bitlm_kernels.h, "low-bit heads").

HEAD_GROUP = 32
HEAD_BITS = {"int6": 6, "int4": 4}


def _head_geometry(bits: int, n: int, k: int) -> tuple[int, int, int]:
    if bits not in (4, 6):
        raise ValueError(f"low-bit heads have 4 or 6 bits, got {bits}")
    return _ceil_div(n, TILE_N), _ceil_div(k, HEAD_GROUP), 384 if bits == 6 else 256


def head_nbytes(bits: int, n: int, k: int) -> tuple[int, int]:
    """(data bytes, scale values) of an (n, k) low-bit head."""
    tiles, groups, block = _head_geometry(bits, n, k)
    return tiles * groups * block, tiles * groups * TILE_N


def pack_head(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a float (N, K) head to ``bits`` (4 or 6) with per-(row, 32-column group) absmax
    f16 scales and pack it: ``(data uint8 (bytes,), scale float16 (values,))``.

    ``s = f16(max|W_group| / Q)`` (Q = 31 or 7), ``w = clamp(round_half_even(W / float(s)), -Q, Q)``
    (0 where s is 0): the rounded scale is the one the codes are computed against."""
    n, k = w.shape
    rows = 1 << 13  # a big head (128k x 2560) in blocks of whole tiles: bounded temporaries
    if n > rows:
        parts = [pack_head(w[r : r + rows], bits) for r in range(0, n, rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    tiles, groups, _ = _head_geometry(bits, n, k)
    qmax, off = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    wp = torch.zeros(tiles * TILE_N, groups * HEAD_GROUP, dtype=torch.float32)
    wp[:n, :k] = w.detach().float().cpu()
    wg = wp.view(tiles * TILE_N, groups, HEAD_GROUP)
    s16 = (wg.abs().amax(-1) / qmax).clamp(max=65504.0).to(torch.float16)  # (Np, G)
    sf = s16.float().unsqueeze(-1)
    q = torch.where(sf > 0, torch.round(wg / torch.where(sf > 0, sf, 1.0)), 0.0).clamp(-qmax, qmax)
    codes = (q.to(torch.int32) + off).view(tiles, TILE_N, groups, 8, 4).permute(0, 2, 3, 1, 4)  # t, g, o, r, b
    low = (codes & 15).reshape(tiles, groups, 4, 2, TILE_N, 4)
    parts = [(low[:, :, :, 0] | (low[:, :, :, 1] << 4)).reshape(tiles, groups, 256)]
    if bits == 6:
        hi = (codes >> 4).reshape(tiles, groups, 2, 4, TILE_N, 4)
        hb = hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)
        parts.append(hb.reshape(tiles, groups, 128))
    data = torch.cat(parts, dim=-1).to(torch.uint8).reshape(-1).contiguous()
    scale = s16.view(tiles, TILE_N, groups).permute(0, 2, 1).reshape(-1).contiguous()
    return data, scale


def unpack_head(data: torch.Tensor, scale: torch.Tensor, bits: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_head`: ``(w int8 (N, K), s float32 (N, groups))`` (padding dropped)."""
    tiles, groups, block = _head_geometry(bits, n, k)
    nbytes, nscale = head_nbytes(bits, n, k)
    if data.dtype != torch.uint8 or data.numel() != nbytes:
        raise ValueError(f"int{bits} head data must be {nbytes} uint8 values, got {data.dtype} x {data.numel()}")
    if scale.dtype != torch.float16 or scale.numel() != nscale:
        raise ValueError(f"int{bits} head scale must be {nscale} float16 values, got {scale.dtype} x {scale.numel()}")
    blk = data.reshape(tiles, groups, block).to(torch.int32)
    low = blk[..., :256].reshape(tiles, groups, 4, 1, TILE_N, 4)
    codes = torch.cat([low & 15, low >> 4], dim=3).reshape(tiles, groups, 8, TILE_N, 4)  # o = 2j + h
    if bits == 6:
        hb = blk[..., 256:].reshape(tiles, groups, 2, 1, TILE_N, 4)
        hi = torch.cat([(hb >> (2 * q)) & 3 for q in range(4)], dim=3).reshape(tiles, groups, 8, TILE_N, 4)
        codes = codes | (hi << 4)
    w = codes.permute(0, 3, 1, 2, 4).reshape(tiles * TILE_N, groups * HEAD_GROUP) - (1 << (bits - 1))
    s = scale.reshape(tiles, groups, TILE_N).permute(0, 2, 1).reshape(tiles * TILE_N, groups).float()
    return w[:n, :k].to(torch.int8).contiguous(), s[:n].contiguous()
