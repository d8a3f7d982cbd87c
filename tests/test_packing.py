"""Packing formats: exhaustive byte-level round trips, the documented layouts re-derived
independently, random odd shapes, Hugging Face compatibility and clear errors on bad input."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import bitlm
from bitlm import packing as P
from bitlm import quant as Q

TERNARY = ("i2", "t1", "hf")
ALL = ("i2", "t1", "b1", "hf")


def random_t(fmt: str, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    alpha = torch.tensor(P.get_format(fmt).alphabet, dtype=torch.int8)
    return alpha[torch.randint(len(alpha), (n, k), generator=gen)]


# --- independent per-element decoders, written from the docstring formulas -------------------


def decode_i2_formula(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    t = torch.empty(n, k, dtype=torch.int8)
    d = data.tolist()
    for row in range(n):
        tile, r = divmod(row, 16)
        for col in range(k):
            c, j = divmod(col, 16)
            q, b = divmod(j, 4)
            t[row, col] = ((d[tile][64 * c + 4 * r + b] >> (2 * q)) & 3) - 1
    return t


def t1_value(byte: int) -> int | None:
    """The v in 0..242 with ceil(256 v / 243) == byte, or None."""
    for v in range(243):
        if -(-256 * v // 243) == byte:
            return v
    return None


def decode_t1_formula(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    t = torch.empty(n, k, dtype=torch.int8)
    d = data.tolist()
    for row in range(n):
        tile, r = divmod(row, 16)
        for col in range(k):
            c, j = divmod(col, 20)
            i, b = divmod(j, 4)
            v = t1_value(d[tile][64 * c + 4 * r + b])
            t[row, col] = (v // 3 ** (4 - i)) % 3 - 1  # digit i, most significant first
    return t


def decode_b1_formula(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    t = torch.empty(n, k, dtype=torch.int8)
    d = data.tolist()
    for row in range(n):
        tile, r = divmod(row, 16)
        for col in range(k):
            c, j = divmod(col, 32)
            q, b = divmod(j, 4)
            word = int.from_bytes(bytes(d[tile][64 * c + 8 * q: 64 * c + 8 * q + 8]), "little")
            t[row, col] = 1 if (word >> (4 * r + b)) & 1 else -1
    return t


def decode_hf_formula(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    rr = data.shape[0]
    t = torch.empty(n, k, dtype=torch.int8)
    for row in range(n):
        i, r = divmod(row, rr)
        for col in range(k):
            t[row, col] = ((int(data[r, col]) >> (2 * i)) & 3) - 1
    return t


# --- exhaustive byte patterns -------------------------------------------------------------------

I2_VALID = [sum(c << (2 * q) for q, c in enumerate(codes)) for codes in itertools.product(range(3), repeat=4)]
T1_VALID = [-(-256 * v // 243) for v in range(243)]


def tile_of_patterns(values: list[int], block_k: int) -> tuple[torch.Tensor, int, int]:
    """One 16-row tile whose chunk c has byte j = values[(c + j) % len(values)]: every value
    appears in every one of the 64 byte positions."""
    nv = len(values)
    data = torch.tensor([[values[(c + j) % nv] for c in range(nv) for j in range(64)]], dtype=torch.uint8)
    return data, 16, nv * block_k


def test_i2_all_81_valid_bytes_every_position():
    assert len(set(I2_VALID)) == 81
    data, n, k = tile_of_patterns(I2_VALID, 16)
    t = P.unpack_tensor(data, "i2", n, k)
    assert torch.equal(t, decode_i2_formula(data, n, k))
    assert torch.equal(P.pack_tensor(t, "i2"), data)


def test_i2_all_175_invalid_bytes_raise():
    invalid = sorted(set(range(256)) - set(I2_VALID))
    assert len(invalid) == 256 - 81
    base = P.pack_tensor(torch.zeros(16, 16, dtype=torch.int8), "i2")
    for byte in invalid:
        bad = base.clone()
        bad[0, 37] = byte
        with pytest.raises(ValueError, match="invalid 2-bit code"):
            P.unpack_tensor(bad, "i2", 16, 16)


def test_t1_all_243_valid_bytes_every_position():
    assert len(set(T1_VALID)) == 243 and max(T1_VALID) <= 255
    data, n, k = tile_of_patterns(T1_VALID, 20)
    t = P.unpack_tensor(data, "t1", n, k)
    assert torch.equal(t, decode_t1_formula(data, n, k))
    assert torch.equal(P.pack_tensor(t, "t1"), data)


def test_t1_multiply_by_3_rule_decodes_every_valid_byte():
    """The decode rule of the docstring (and of csrc): m0 = byte, d_i = 3m >> 8, m = 3m & 255."""
    for v, byte in enumerate(T1_VALID):
        m, digits = byte, []
        for _ in range(5):
            digits.append((3 * m) >> 8)
            m = (3 * m) & 255
        assert sum(d * 3 ** (4 - i) for i, d in enumerate(digits)) == v


def test_t1_all_13_invalid_bytes_raise():
    invalid = sorted(set(range(256)) - set(T1_VALID))
    assert len(invalid) == 13
    base = P.pack_tensor(torch.zeros(16, 20, dtype=torch.int8), "t1")
    for byte in invalid:
        bad = base.clone()
        bad[0, 5] = byte
        with pytest.raises(ValueError, match="not base-3 codes"):
            P.unpack_tensor(bad, "t1", 16, 20)


def test_b1_all_256_bytes_every_position():
    data, n, k = tile_of_patterns(list(range(256)), 32)
    t = P.unpack_tensor(data, "b1", n, k)
    assert torch.equal(t, decode_b1_formula(data, n, k))
    assert torch.equal(P.pack_tensor(t, "b1"), data)


def test_hf_all_81_valid_bytes_and_invalid():
    data = torch.tensor([I2_VALID], dtype=torch.uint8)  # R = 1: rows 0..3 in bits 0..7
    t = P.unpack_tensor(data, "hf", 4, 81)
    assert torch.equal(t, decode_hf_formula(data, 4, 81))
    assert torch.equal(P.pack_tensor(t, "hf"), data)
    with pytest.raises(ValueError, match="invalid 2-bit code"):
        P.unpack_tensor(torch.full((1, 3), 0b11, dtype=torch.uint8), "hf", 4, 3)


# --- random shapes: odd N, K not a multiple of the block ----------------------------------------

SHAPES = [(1, 1), (3, 5), (17, 33), (31, 21), (67, 301), (16, 16), (33, 640), (5, 97)]


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_random_shapes(fmt, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt}{shape}".encode()))
    n, k = shape
    t = random_t(fmt, n, k, gen)
    data = P.pack_tensor(t, fmt)
    f = P.get_format(fmt)
    assert data.dtype == torch.uint8 and tuple(data.shape) == f.packed_shape(n, k)
    assert torch.equal(P.unpack_tensor(data, fmt, n, k), t)
    if n * k <= 3000:
        formula = {"i2": decode_i2_formula, "t1": decode_t1_formula, "b1": decode_b1_formula,
                   "hf": decode_hf_formula}[fmt]
        assert torch.equal(formula(data, n, k), t)


@pytest.mark.parametrize("fmt", ("i2", "t1", "b1"))
def test_padding_is_canonical(fmt):
    """Padding rows/columns hold a zero weight (i2, t1) or bit 0 (b1): packing is deterministic
    and the padded region decodes to the documented value."""
    f = P.get_format(fmt)
    n, k = 17, f.block_k + 3
    t = random_t(fmt, n, k, torch.Generator().manual_seed(3))
    data = P.pack_tensor(t, fmt)
    tiles, nbytes = f.packed_shape(n, k)
    full = f.unpack(data, tiles * 16, nbytes // 64 * f.block_k)
    pad_value = -1 if fmt == "b1" else 0
    assert torch.equal(full[:n, :k], t)
    assert bool((full[n:] == pad_value).all()) and bool((full[:, k:] == pad_value).all())


def test_bits_per_weight():
    assert {n: f.bits_per_weight for n, f in P.FORMATS.items()} == {"i2": 2.0, "t1": 1.6, "b1": 1.0, "hf": 2.0}
    for fmt, bpw in (("i2", 2.0), ("t1", 1.6), ("b1", 1.0)):
        w = P.pack_weight(random_t(fmt, 2560, 2560, torch.Generator().manual_seed(0)), 0.1, fmt)
        assert w.bits_per_weight == pytest.approx(bpw)  # 2560 is a multiple of every block
    w = P.pack_weight(torch.zeros(2560, 6912, dtype=torch.int8), 0.1, "t1")
    assert w.bits_per_weight == pytest.approx(1.6 * 6920 / 6912)


def test_hf_matches_transformers_pack_weights():
    bitnet = pytest.importorskip("transformers.integrations.bitnet")
    gen = torch.Generator().manual_seed(7)
    for n, k in ((8, 5), (7, 5), (13, 9), (640, 33)):
        t = random_t("hf", n, k, gen)
        ours = P.pack_tensor(t, "hf")
        theirs = bitnet.pack_weights(t.clone())
        assert torch.equal(ours, theirs)
        back = bitnet.unpack_weights(ours, dtype=torch.float32)[:n]
        assert torch.equal(back.to(torch.int8), P.unpack_tensor(ours, "hf", n, k))


# --- invalid input --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL)
def test_values_outside_the_alphabet_raise(fmt):
    bad_values = (2, -2, 5) if fmt != "b1" else (0, 2, -3)
    for v in bad_values:
        t = torch.ones(5, 7, dtype=torch.int8)
        t[2, 3] = v
        with pytest.raises(ValueError, match="must be in"):
            P.pack_tensor(t, fmt)


@pytest.mark.parametrize("fmt", ALL)
def test_wrong_types_and_shapes_raise(fmt):
    with pytest.raises(ValueError, match="2-D"):
        P.pack_tensor(torch.ones(7, dtype=torch.int8), fmt)
    with pytest.raises(ValueError, match="2-D"):
        P.pack_tensor(torch.ones(2, 3, 4, dtype=torch.int8), fmt)
    with pytest.raises(TypeError, match="integer"):
        P.pack_tensor(torch.ones(3, 4), fmt)
    data = P.pack_tensor(torch.ones(5, 7, dtype=torch.int8), fmt)
    with pytest.raises(ValueError, match="expected"):
        P.unpack_tensor(data, fmt, 5, 7000)
    with pytest.raises(TypeError, match="uint8"):
        P.unpack_tensor(data.to(torch.int16), fmt, 5, 7)
    with pytest.raises(ValueError, match="unknown packing format"):
        P.get_format("q4")


def test_packed_weight_validation():
    t = torch.ones(6, 10, dtype=torch.int8)
    w = P.pack_weight(t, torch.tensor([0.5, 0.25]), "i2")
    assert (w.N, w.K, w.groups, w.version) == (6, 10, 2, 1)
    with pytest.raises(ValueError, match="groups"):
        P.pack_weight(t, torch.tensor([0.5, 0.25, 0.1, 0.2]), "i2")  # 6 rows into 4 groups
    with pytest.raises(ValueError, match="scale has"):
        P.PackedWeight("i2", 1, 6, 10, w.data, torch.tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="version"):
        P.PackedWeight("i2", 99, 6, 10, w.data, w.scale, 2)
    with pytest.raises(ValueError, match="shape"):
        P.PackedWeight("i2", 1, 40, 10, w.data, w.scale, 2)


def test_packed_weight_dequantize_and_convert():
    gen = torch.Generator().manual_seed(11)
    wf = torch.randn(66, 45, generator=gen)
    pw = P.quantize_and_pack(wf, "i2", groups=3)
    t, s = Q.ternary_quantize(wf, 3)
    assert torch.equal(pw.unpack(), t) and torch.equal(pw.scale, s)
    assert torch.equal(pw.dequantize(), Q.dequantize_weight(t, s))
    for fmt in ("t1", "hf", "i2"):
        other = pw.to_format(fmt)
        assert other.format == fmt and torch.equal(other.unpack(), t) and torch.equal(other.scale, s)
    with pytest.raises(ValueError, match="must be in"):
        pw.to_format("b1")  # ternary zeros do not fit a binary format
    pb = bitlm.pack(wf, "b1")  # bitlm.pack on a float tensor: quantise (b1: sign) and pack
    tb, sb = Q.weight_quantize(wf, "b1")
    assert torch.equal(pb.unpack(), tb) and torch.equal(pb.scale, sb)
