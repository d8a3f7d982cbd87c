"""The ``.bitlm`` container (bitlm.io.packed) on its own: header dict + named tensors in, the
same out, 64-byte aligned, CRC-checked — no PackedModel involved."""

import struct

import pytest
import torch

from bitlm.io.packed import ALIGN, MAGIC, VERSION, PackedFormatError, read_header, read_packed, write_packed


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.data": torch.randint(0, 255, (3, 70), dtype=torch.uint8, generator=g),
            "a.scale": torch.rand(5, generator=g),
            "b": torch.randn(2, 3, generator=g).to(torch.bfloat16),
            "empty": torch.empty(0, dtype=torch.int8)}


def test_round_trip_header_and_tensors(tmp_path):
    p = write_packed(tmp_path / "x.bitlm", {"model": {"d": 1}, "format": "i2"}, _tensors(), tokenizer="{}")
    raw = p.read_bytes()
    assert raw[:8] == MAGIC and struct.unpack("<I", raw[8:12])[0] == VERSION
    h = read_header(p)
    assert list(h) == ["model", "format", "tensors", "tokenizer", "data_bytes"]
    assert h["model"] == {"d": 1} and h["tokenizer"] == "{}"
    assert all(e["offset"] % ALIGN == 0 for e in h["tensors"])
    seen = []
    header, tensors, mm = read_packed(p, check_header=lambda hd: seen.append(hd["format"]))
    assert seen == ["i2"] and header == h
    for name, t in _tensors().items():
        assert tensors[name].dtype == t.dtype and torch.equal(tensors[name], t), name


def test_corrupt_tensor_is_named_and_header_check_runs_first(tmp_path):
    p = write_packed(tmp_path / "x.bitlm", {"format": "i2"}, _tensors())
    h = read_header(p)
    e = next(e for e in h["tensors"] if e["name"] == "a.scale")
    hlen = struct.unpack("<Q", p.read_bytes()[16:24])[0]
    start = -(-(24 + hlen) // ALIGN) * ALIGN
    raw = bytearray(p.read_bytes())
    raw[start + e["offset"]] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(PackedFormatError, match="'a.scale' is corrupt"):
        read_packed(p)
    read_packed(p, verify=False)  # the CRC check is what caught it

    def refuse(_header):
        raise PackedFormatError("header refused")

    with pytest.raises(PackedFormatError, match="header refused"):  # before any CRC is computed
        read_packed(p, check_header=refuse)
