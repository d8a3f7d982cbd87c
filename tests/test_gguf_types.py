"""The BitNet runtimes' tensor types (bitlm.io.gguf_types), checked against hand-built blocks.

Each reference below is a scalar loop written from the layout the runtimes document in their
dequantisers (bitnet.cpp ``quantize_i2_s``, ik_llama.cpp ``dequantize_row_ms_i2s``,
``dequantize_block_iq2_bn`` / ``iq1_bn``, ``dequantize_row_iq2_bn_r4``), one weight at a time, so
that the vectorised codecs are compared with something structurally different.  The patterns put
every code in every position of a block, and the shapes include odd row counts.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitlm.io import gguf_types as GT


def every_code_everywhere(rows: int, n: int, block: int) -> np.ndarray:
    """T [rows, n] in which each position of a block sees -1, 0 and +1 (over blocks and rows)."""
    k = np.arange(rows * n).reshape(rows, n)
    blk = k // block
    return (((k % block) + blk) % 3 - 1).astype(np.int8)


# ---- scalar references ------------------------------------------------------------------------


def ref_i2s_bytes(t: np.ndarray, s: float) -> bytes:
    flat = (t.reshape(-1) + 1).tolist()
    out = bytearray(len(flat) // 4 + 32)
    for b in range(len(flat) // 128):
        for j in range(32):
            out[32 * b + j] = (flat[128 * b + j] << 6) | (flat[128 * b + j + 32] << 4) \
                | (flat[128 * b + j + 64] << 2) | flat[128 * b + j + 96]
    out[len(flat) // 4 : len(flat) // 4 + 4] = np.float32(s).tobytes()
    return bytes(out)


def ref_iq2bn_bytes(t: np.ndarray, d: np.ndarray) -> bytes:
    out = bytearray()
    for r in range(t.shape[0]):
        out += np.float32(d[r]).tobytes()
        c = (t[r] + 1).tolist()
        for b in range(t.shape[1] // 64):
            for j in range(16):
                x = c[64 * b:64 * b + 64]
                out.append(x[j] | (x[j + 16] << 2) | (x[j + 32] << 4) | (x[j + 48] << 6))
    return bytes(out)


def ref_iq2bn_r4_decode(raw: bytes, rows: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.zeros((rows, n), np.int8)
    d = np.zeros(rows, np.float32)
    group = 16 + n
    for g in range(rows // 4):
        base = raw[g * group:(g + 1) * group]
        d[4 * g:4 * g + 4] = np.frombuffer(base[:16], "<f4")
        q = base[16:]
        for ib in range(n // 64):
            for k in range(4):
                for l, i in itertools.product(range(4), range(4)):
                    byte = q[64 * ib + 4 * k + i + 16 * l]
                    for b in range(4):
                        t[4 * g + k, 64 * ib + 16 * l + i + 4 * b] = ((byte >> 2 * b) & 3) - 1
    return t, d


def ref_trit(byte: int, j: int) -> int:
    v = (int(byte) * (81, 27, 9, 3, 1)[j]) & 0xFF
    return ((v + (v >> 1)) >> 7) - 1


def ref_iq1bn_decode(raw: bytes, rows: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    t = np.zeros((rows, n), np.int8)
    d = np.zeros(rows, np.float32)
    row_bytes = 2 + n // 64 * 13
    for r in range(rows):
        row = raw[r * row_bytes:(r + 1) * row_bytes]
        d[r] = np.frombuffer(row[:2], "<f2")[0]
        for ib in range(n // 64):
            blk = row[2 + 13 * ib:2 + 13 * ib + 13]
            for g in range(4):
                for k in range(3):
                    for j in range(5):
                        t[r, 64 * ib + 16 * g + 5 * k + j] = ref_trit(blk[3 * g + k], j)
                t[r, 64 * ib + 16 * g + 15] = ref_trit(blk[12], g)
    return t, d


# ---- I2_S --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,n", [(1, 128), (3, 256), (5, 384)])
def test_i2s_hand_built_blocks(rows, n):
    t = every_code_everywhere(rows, n, 128)
    s = np.float32(0.0123)
    raw = GT.encode(GT.I2_S, t, s)
    assert raw.tobytes() == ref_i2s_bytes(t, s)
    assert raw.size == rows * n // 4 + 32 == GT.nbytes(GT.I2_S, (n, rows))
    assert raw[rows * n // 4 :][4:].tobytes() == bytes(28)  # the rest of the tail is zero
    got_t, got_s = GT.decode(GT.I2_S, raw, (n, rows))
    assert np.array_equal(got_t, t) and np.all(got_s == s)


def test_i2s_byte_order_is_top_bits_first():
    t = np.zeros((1, 128), np.int8)
    t[0, 0], t[0, 32], t[0, 64], t[0, 96] = 1, -1, 0, 1  # codes 2, 0, 1, 2 → 0b10_00_01_10
    raw = GT.encode(GT.I2_S, t, 1.0)
    assert raw[0] == 0b10000110 and set(raw[1:32].tolist()) == {0b01010101}


def test_i2s_refuses_code_3_wrong_sizes_and_bad_scale():
    t = every_code_everywhere(2, 128, 128)
    raw = GT.encode(GT.I2_S, t, 0.5)
    bad = raw.copy()
    bad[5] |= 0b11  # weight 96 + 5 of block 0
    with pytest.raises(ValueError, match=r"unused code 0b11 .*first at weight 101"):
        GT.decode(GT.I2_S, bad, (128, 2))
    with pytest.raises(ValueError, match="has 95 bytes; I2_S of this shape has 96"):
        GT.decode(GT.I2_S, raw[:-1], (128, 2))
    with pytest.raises(ValueError, match="multiple of 128"):
        GT.decode(GT.I2_S, raw, (64, 4))  # the 64-weight (ARM build) block size
    nan = raw.copy()
    nan[64:68] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(ValueError, match="scale nan"):
        GT.decode(GT.I2_S, nan, (128, 2))
    with pytest.raises(ValueError, match="one per tensor"):
        GT.encode(GT.I2_S, t, np.ones(2, np.float32))
    with pytest.raises(ValueError, match="other than -1, 0, 1"):
        GT.encode(GT.I2_S, t * 2, 1.0)


# ---- IQ2_BN / IQ2_BN_R4 -------------------------------------------------------------------------


@pytest.mark.parametrize("rows,n", [(1, 64), (3, 192), (7, 128)])
def test_iq2bn_hand_built_blocks(rows, n):
    t = every_code_everywhere(rows, n, 64)
    d = (np.arange(rows, dtype=np.float32) + 1) * np.float32(0.37)
    raw = GT.encode(GT.IQ2_BN, t, d)
    assert raw.tobytes() == ref_iq2bn_bytes(t, d)
    assert raw.size == GT.nbytes(GT.IQ2_BN, (n, rows)) == rows * (4 + n // 4)
    got_t, got_d = GT.decode(GT.IQ2_BN, raw, (n, rows))
    assert np.array_equal(got_t, t) and np.array_equal(got_d, d)
    bad = raw.copy()
    bad[4] |= 0b11000000  # row 0, block 0, byte 0, bits 7-6: weight 48
    with pytest.raises(ValueError, match="first at weight 48"):
        GT.decode(GT.IQ2_BN, bad, (n, rows))


@pytest.mark.parametrize("rows,n", [(4, 64), (8, 192)])
def test_iq2bn_r4_hand_built_blocks(rows, n):
    t = every_code_everywhere(rows, n, 64)
    d = (np.arange(rows, dtype=np.float32) + 1) * np.float32(0.11)
    raw = GT.encode(GT.IQ2_BN_R4, t, d)
    assert raw.size == GT.nbytes(GT.IQ2_BN_R4, (n, rows)) == GT.nbytes(GT.IQ2_BN, (n, rows))
    ref_t, ref_d = ref_iq2bn_r4_decode(raw.tobytes(), rows, n)
    assert np.array_equal(ref_t, t) and np.array_equal(ref_d, d)
    got_t, got_d = GT.decode(GT.IQ2_BN_R4, raw, (n, rows))
    assert np.array_equal(got_t, t) and np.array_equal(got_d, d)
    with pytest.raises(ValueError, match="multiple of 4"):
        GT.encode(GT.IQ2_BN_R4, t[:3], d[:3])


# ---- IQ1_BN -------------------------------------------------------------------------------------


def test_iq1bn_every_byte_value_decodes_as_the_runtime():
    """All 243 five-trit groups and all 81 four-trit groups survive encode → the runtime's decode."""
    for trits in itertools.product((-1, 0, 1), repeat=5):
        t = np.zeros((1, 64), np.int8)
        t[0, :5] = trits  # the first byte ql[0]
        raw = GT.encode(GT.IQ1_BN, t, 1.0)
        assert [ref_trit(raw[2], j) for j in range(5)] == list(trits)
    for trits in itertools.product((-1, 0, 1), repeat=4):
        t = np.zeros((1, 64), np.int8)
        t[0, [15, 31, 47, 63]] = trits  # the 13th byte
        raw = GT.encode(GT.IQ1_BN, t, 1.0)
        assert [ref_trit(raw[2 + 12], g) for g in range(4)] == list(trits)


@pytest.mark.parametrize("rows,n", [(1, 64), (3, 192), (5, 128)])
def test_iq1bn_hand_built_blocks(rows, n):
    t = every_code_everywhere(rows, n, 64)
    d = np.float32([0.5, 0.0625, 3.25, 1.0, 2.0][:rows])
    raw = GT.encode(GT.IQ1_BN, t, d)
    assert raw.size == GT.nbytes(GT.IQ1_BN, (n, rows)) == rows * (2 + n // 64 * 13)
    ref_t, ref_d = ref_iq1bn_decode(raw.tobytes(), rows, n)
    assert np.array_equal(ref_t, t) and np.array_equal(ref_d, d)
    got_t, got_d = GT.decode(GT.IQ1_BN, raw, (n, rows))
    assert np.array_equal(got_t, t) and np.array_equal(got_d, d)


def test_iq1bn_rounds_the_row_scale_to_f16():
    t = np.ones((1, 64), np.int8)
    _, d = GT.decode(GT.IQ1_BN, GT.encode(GT.IQ1_BN, t, np.float32(0.1)), (64, 1))
    assert d[0] == np.float32(np.float16(0.1)) != np.float32(0.1)


def test_bn_rows_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 64"):
        GT.encode(GT.IQ2_BN, np.zeros((2, 96), np.int8), 1.0)
    assert GT.shape_problem(GT.IQ1_BN, (96, 2)) is not None
    assert GT.shape_problem(GT.IQ2_BN, (128, 3)) is None
