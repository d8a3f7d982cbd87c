"""The BitNet tensor types of bitnet.cpp and ik_llama.cpp, byte for byte: encode and decode.

The ``gguf`` package knows llama.cpp's TQ1_0 / TQ2_0 (``bitlm.io.gguf`` uses it for those) but
not the types below, which only the BitNet runtimes define.  Each codec turns ternary codes
T ∈ {-1, 0, 1} and their scale into the tensor's bytes and back, exactly as the runtimes lay
them out (read from bitnet.cpp's ``src/ggml-bitnet-mad.cpp`` and ik_llama.cpp's
``ggml/src/iqk/iqk_quantize.cpp`` / ``ggml-cuda/convert.cu``).  Every code is w + 1, so 0b00 = -1,
0b01 = 0, 0b10 = +1; the two-bit code 0b11 is never written and decoding refuses it.

``I2_S`` (ggml type 36; bitnet.cpp, ``microsoft/bitnet-b1.58-2B-4T-gguf``)
    One float32 scale per *tensor*.  The n codes of the flattened tensor come first in
    128-weight blocks of 32 bytes: byte j of a block holds weights j, j+32, j+64, j+96 in bits
    7-6, 5-4, 3-2, 1-0.  Then 32 bytes of tail, whose first 4 bytes are the scale: n/4 + 32
    bytes in all.  This is the x86 layout (``QK_I2_S`` = 128 with bitnet.cpp's default
    ``ACT_PARALLEL``), the one published files use.  bitnet.cpp builds for ARM write 64-weight
    blocks, and x86 builds without ``ACT_PARALLEL`` interleave 4 rows per byte; those files have
    the same size and the same codes, so no reader can tell them apart by their bytes — a file
    from such a build is only refused when its sizes or codes do not fit (rows not a multiple of
    128, a wrong byte count, a 0b11 code).
``IQ2_BN`` (135; ik_llama.cpp)
    Per row: a float32 scale d, then 64-weight blocks of 16 bytes; byte j holds weights j, j+16,
    j+32, j+48 in bits 1-0, 3-2, 5-4, 7-6.  Value = d·(code - 1).
``IQ2_BN_R4`` (335; ik_llama.cpp)
    IQ2_BN with 4 rows interleaved: per group of 4 rows, their 4 float32 scales, then per
    64-weight block 64 bytes; byte 16·l + 4·k + i holds row k's weights 16·l + i + 4·b in bits
    2b..2b+1 (b = 0..3).  Same size as IQ2_BN; the row count must be a multiple of 4.
``IQ1_BN`` (134; ik_llama.cpp, 1.625 bits/weight)
    Per row: an f16 scale d, then 64-weight blocks of 13 bytes.  Block weights 16·g .. 16·g+14
    (g = 0..3) are three bytes ``ql[3g + k]`` of 5 trits each (weights 16g + 5k + j,
    j = 0..4); weight 16g + 15 is trit g of the 13th byte.  A byte holds trits q_j as the
    base-3 fixed-point number ⌈256·Σ 3^j q_j / 243⌉; trit j is read back as
    ((v + (v >> 1)) >> 7) with v = (byte · 3^(4-j)) mod 256, the runtime's own arithmetic.

All functions work on numpy arrays; ``t`` is int8 [rows, n] in numpy order (a weight matrix is
[out, in], rows along the output).  Errors are ``ValueError`` whose message completes
"tensor X …" (the caller names the tensor and file).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "I2_S", "IQ1_BN", "IQ2_BN", "IQ2_BN_R4", "TYPE_NAMES", "TERNARY_TYPE_IDS",
    "I2S_BLOCK", "I2S_TAIL", "BN_BLOCK",
    "nbytes", "shape_problem", "encode", "decode",
]

I2_S, IQ1_BN, IQ2_BN, IQ2_BN_R4 = 36, 134, 135, 335
TYPE_NAMES = {I2_S: "I2_S", IQ1_BN: "IQ1_BN", IQ2_BN: "IQ2_BN", IQ2_BN_R4: "IQ2_BN_R4"}
#: --gguf-type name → ggml type id
TERNARY_TYPE_IDS = {"i2_s": I2_S, "iq1_bn": IQ1_BN, "iq2_bn": IQ2_BN, "iq2_bn_r4": IQ2_BN_R4}
I2S_BLOCK, I2S_TAIL = 128, 32  # weights per block (x86 layout); bytes after the codes
BN_BLOCK = 64  # IQ1_BN / IQ2_BN weights per block
_IQ1_BLOCK_BYTES = 13
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.int32)


def _rows_n(dims: tuple[int, ...]) -> tuple[int, int]:
    """(rows, weights per row) of a tensor given in GGUF order (innermost first)."""
    return math.prod(dims[1:]), dims[0]


def shape_problem(type_id: int, dims: tuple[int, ...]) -> str | None:
    """Why a tensor of ``dims`` (GGUF order) cannot have this type, or None."""
    rows, n = _rows_n(dims)
    name = TYPE_NAMES[type_id]
    if type_id == I2_S:
        if n % I2S_BLOCK:
            return (f"has rows of {n} weights; {name} (x86 layout, {I2S_BLOCK}-weight blocks) needs a "
                    f"multiple of {I2S_BLOCK}")
        return None
    if n % BN_BLOCK:
        return f"has rows of {n} weights; {name} needs a multiple of {BN_BLOCK}"
    if type_id == IQ2_BN_R4 and rows % 4:
        return f"has {rows} rows; {name} interleaves 4 rows and needs a multiple of 4"
    return None


def nbytes(type_id: int, dims: tuple[int, ...]) -> int:
    """The tensor's byte size in the file (I2_S: n/4 codes + 32 bytes of tail)."""
    rows, n = _rows_n(dims)
    if type_id == I2_S:
        return rows * n // 4 + I2S_TAIL
    if type_id == IQ1_BN:
        return rows * (2 + n // BN_BLOCK * _IQ1_BLOCK_BYTES)
    return rows * (4 + n // 4)  # IQ2_BN and IQ2_BN_R4


# ----------------------------------------------------------------------------------------------
# encode: (T, scales) → bytes
# ----------------------------------------------------------------------------------------------


def encode(type_id: int, t: np.ndarray, scales: np.ndarray | float) -> np.ndarray:
    """Bytes (uint8, flat) of ternary ``t`` [rows, n] with ``scales``: one value for I2_S, one
    per row (or one broadcast to every row) for the IQ types (IQ1_BN rounds it to f16)."""
    t = np.asarray(t)
    if t.ndim != 2:
        raise ValueError(f"expects a 2-D ternary matrix, got shape {t.shape}")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("holds values other than -1, 0, 1")
    problem = shape_problem(type_id, (t.shape[1], t.shape[0]))
    if problem:
        raise ValueError(problem)
    codes = (t.astype(np.int16) + 1).astype(np.uint8)
    rows, n = t.shape
    if type_id == I2_S:
        s = np.asarray(scales, dtype=np.float32).reshape(-1)
        if s.size != 1:
            raise ValueError(f"has {s.size} scales; I2_S holds one per tensor")
        c = codes.reshape(-1, 4, 32)  # block, group g (weights 32g + j), position j
        packed = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]
        tail = np.zeros(I2S_TAIL, dtype=np.uint8)
        tail[:4] = s.astype("<f4").view(np.uint8)
        return np.concatenate([packed.reshape(-1), tail])
    d = np.broadcast_to(np.asarray(scales, dtype=np.float32).reshape(-1), (rows,)).copy()
    nb = n // BN_BLOCK
    if type_id == IQ1_BN:
        c = codes.reshape(rows, nb, 4, 16).astype(np.int32)
        five = c[..., :15].reshape(rows, nb, 4, 3, 5)  # ql[3g + k] holds weights 16g + 5k + j
        ql = (256 * (five * _POW3).sum(-1) + 242) // 243
        extra = (256 * (c[..., 15] * _POW3[:4]).sum(-1) + 242) // 243  # weight 16g + 15 is trit g
        blocks = np.concatenate([ql.reshape(rows, nb, 12), extra[..., None]], axis=-1).astype(np.uint8)
        head = d.astype("<f2").view(np.uint8).reshape(rows, 2)
        return np.concatenate([head, blocks.reshape(rows, -1)], axis=1).reshape(-1)
    c = codes.reshape(rows, nb, 4, 16)  # bit pair l, position j: weight 16l + j
    qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)  # [rows, nb, 16]
    head = d.astype("<f4").view(np.uint8).reshape(rows, 4)
    if type_id == IQ2_BN:
        return np.concatenate([head, qs.reshape(rows, -1)], axis=1).reshape(-1)
    # IQ2_BN_R4: [group, row k, block, l, b, i] with weight 16l + 4b + i → byte 16l + 4k + i
    c6 = codes.reshape(rows // 4, 4, nb, 4, 4, 4)
    shifted = c6 << (2 * np.arange(4, dtype=np.uint8))[:, None]  # bits 2b.. for each b
    byte = np.bitwise_or.reduce(shifted, axis=4)  # [group, k, block, l, i]
    byte = byte.transpose(0, 2, 3, 1, 4).reshape(rows // 4, nb * 64)  # [group, block·l·k·i]
    return np.concatenate([head.reshape(rows // 4, 16), byte], axis=1).reshape(-1)


# ----------------------------------------------------------------------------------------------
# decode: bytes → (T, scales)
# ----------------------------------------------------------------------------------------------


def _no_code_3(codes: np.ndarray, name: str, positions: np.ndarray | None = None) -> None:
    bad = np.flatnonzero(codes.reshape(-1) == 3)
    if bad.size:
        at = int(bad[0] if positions is None else positions.reshape(-1)[bad[0]])
        raise ValueError(f"holds the unused code 0b11 ({bad.size} times, first at weight {at}); "
                         f"not a {name} tensor of the layout bitlm reads")


def decode(type_id: int, raw: np.ndarray, dims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(T int8 [rows, n], scales float32 [rows]) from a tensor's bytes; ``dims`` in GGUF order.
    I2_S repeats its one scale for every row."""
    name = TYPE_NAMES[type_id]
    problem = shape_problem(type_id, dims)
    if problem:
        raise ValueError(problem)
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    want = nbytes(type_id, dims)
    if raw.size != want:
        raise ValueError(f"has {raw.size} bytes; {name} of this shape has {want}")
    rows, n = _rows_n(dims)
    if type_id == I2_S:
        packed = raw[: rows * n // 4].reshape(-1, 1, 32)
        codes = (packed >> np.array([6, 4, 2, 0], dtype=np.uint8)[:, None]) & 3  # [block, g, j]
        _no_code_3(codes, name)
        s = raw[rows * n // 4 : rows * n // 4 + 4].view("<f4")[0]
        if not np.isfinite(s) or s < 0:
            raise ValueError(f"has the scale {float(s)!r} in its tail; an I2_S scale is a finite value >= 0")
        t = codes.astype(np.int8).reshape(rows, n) - 1
        return t, np.full(rows, s, dtype=np.float32)
    nb = n // BN_BLOCK
    if type_id == IQ1_BN:
        r = raw.reshape(rows, 2 + nb * _IQ1_BLOCK_BYTES)
        d = r[:, :2].copy().view("<f2").astype(np.float32).reshape(rows)
        blocks = r[:, 2:].reshape(rows, nb, _IQ1_BLOCK_BYTES).astype(np.uint32)
        ql = blocks[..., :12].reshape(rows, nb, 4, 3, 1)
        mult = (81 // _POW3).astype(np.uint32)  # 3^(4-j): 81, 27, 9, 3, 1
        v = (ql * mult) & 0xFF
        five = (v + (v >> 1)) >> 7  # [rows, nb, g, k, j]
        ve = (blocks[..., 12:13] * mult[:4]) & 0xFF
        last = (ve + (ve >> 1)) >> 7  # [rows, nb, g]
        trits = np.concatenate([five.reshape(rows, nb, 4, 15), last[..., None]], axis=-1)
        return trits.astype(np.int8).reshape(rows, n) - 1, d
    if type_id == IQ2_BN:
        r = raw.reshape(rows, 4 + n // 4)
        d = r[:, :4].copy().view("<f4").reshape(rows)
        qs = r[:, 4:].reshape(rows, nb, 1, 16)
        codes = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # [rows, nb, l, j]
        _no_code_3(codes, name)
        return codes.astype(np.int8).reshape(rows, n) - 1, d
    # IQ2_BN_R4
    g = raw.reshape(rows // 4, 16 + n)
    d = g[:, :16].copy().view("<f4").reshape(rows)
    byte = g[:, 16:].reshape(rows // 4, nb, 4, 4, 4)  # [group, block, l, k, i]
    codes = (byte[..., None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [group, block, l, k, i, b]
    codes = codes.transpose(0, 3, 1, 2, 5, 4)  # [group, k, block, l, b, i]: weight 16l + 4b + i
    _no_code_3(codes, name)
    return codes.astype(np.int8).reshape(rows, n) - 1, d
