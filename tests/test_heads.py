"""6-bit / 4-bit output heads with per-group f16 scales: the byte layout (``bitlm.packing.pack_head``)
against a literal reading of its documentation, the native kernel (``bitlm_dense_lowbit``) against
its torch twin bit for bit on every tier, the engine (pack, save / load, decode, batched decode)
and bad input."""

from __future__ import annotations

import pytest
import torch

from bitlm import packing as P
from bitlm.engine import Dense, convert, load_packed, save_packed
from bitlm.io.packed import PackedFormatError
from bitlm.kernels import native
from bitlm.kernels import reference as R
from helpers import tiny_model


def _literal_unpack(data: torch.Tensor, scale: torch.Tensor, bits: int, n: int, k: int):
    """The layout as documented, one weight at a time (slow; small shapes only)."""
    groups, block = -(-k // 32), 384 if bits == 6 else 256
    d, s16 = data.tolist(), scale.view(torch.int16).tolist()
    w = torch.zeros(n, k, dtype=torch.int64)
    s = torch.zeros(n, groups)
    for row in range(n):
        t, r = divmod(row, 16)
        for g in range(groups):
            base = (t * groups + g) * block
            s[row, g] = torch.tensor([s16[(t * groups + g) * 16 + r]], dtype=torch.int16).view(torch.float16).float()
            for o in range(8):
                for b in range(4):
                    kk = 32 * g + 4 * o + b
                    if kk >= k:
                        continue
                    byte = d[base + 64 * (o // 2) + 4 * r + b]
                    code = (byte >> 4) if o % 2 else (byte & 15)
                    if bits == 6:
                        code |= ((d[base + 256 + 64 * (o // 4) + 4 * r + b] >> (2 * (o % 4))) & 3) << 4
                    w[row, kk] = code - (32 if bits == 6 else 8)
    return w, s


@pytest.mark.parametrize("bits", (4, 6))
def test_pack_head_layout_is_the_documented_one(bits):
    gen = torch.Generator().manual_seed(bits)
    n, k = 19, 70  # a partial tile and a partial group
    wf = torch.randn(n, k, generator=gen)
    wf[3, :32] = 0.0  # an all-zero group: scale 0, codes 0
    data, scale = P.pack_head(wf, bits)
    assert data.dtype == torch.uint8 and scale.dtype == torch.float16
    assert (data.numel(), scale.numel()) == P.head_nbytes(bits, n, k) == (2 * 3 * (384 if bits == 6 else 256), 2 * 3 * 16)
    w, s = P.unpack_head(data, scale, bits, n, k)
    lw, ls = _literal_unpack(data, scale, bits, n, k)
    assert torch.equal(w.long(), lw) and torch.equal(s, ls)
    qmax = (1 << (bits - 1)) - 1
    assert w.abs().max().item() == qmax  # the absmax of every group maps to +-Q
    assert s[3, 0].item() == 0.0 and not w[3, :32].any()
    # the codes are round(W / s) against the f16-rounded scale, and the group reconstruction is close
    sg = s.repeat_interleave(32, dim=1)[:, :k]
    want = torch.where(sg > 0, torch.round(wf / torch.where(sg > 0, sg, 1.0)), 0.0).clamp(-qmax, qmax)
    assert torch.equal(w.float(), want)
    assert ((w.float() * sg - wf).abs() <= sg / 2 + 1e-6).all()


def _case(gen, bits, m, n, k):
    data, scale = P.pack_head(torch.randn(n, k, generator=gen) * 0.05, bits)
    xq, a = R.quantize_rows(torch.randn(m, k, generator=gen) * 3)
    return xq, a, data, scale


@pytest.mark.parametrize("bits", (4, 6))
@pytest.mark.parametrize("k", (32, 70, 640))
def test_dense_lowbit_bit_identical(tier, bits, k):
    gen = torch.Generator().manual_seed(k + bits)
    for m, n in ((1, 37), (1, 130), (2, 5), (3, 70), (1, 16), (7, 67), (65, 33)):  # (1, 130): tile pairs + 1
        xq, a, data, scale = _case(gen, bits, m, n, k)
        got = native.dense_lowbit_matmul(xq, a, data, scale, bits, n)
        want = R.dense_lowbit_matmul(xq, a, data, scale, bits, n)
        assert got.shape == (m, n) and torch.equal(got, want), (tier, bits, m, n, k)


@pytest.mark.parametrize("bits", (4, 6))
def test_dense_lowbit_extremes_are_exact(tier, bits):
    """Every code at its extreme against -128 / 127 activations: no 16-bit saturation in the
    AVX2 pair sums, exact group sums, the documented float order."""
    qmax = (1 << (bits - 1)) - 1
    n, k = 16, 64
    w = torch.full((n, k), float(qmax))
    w[1::2] = -qmax
    data, scale = P.pack_head(w, bits)
    for xv in (-128, 127):
        xq, a = torch.full((2, k), xv, dtype=torch.int8), torch.tensor([1.0, 3.0])
        got = native.dense_lowbit_matmul(xq, a, data, scale, bits, n)
        assert torch.equal(got, R.dense_lowbit_matmul(xq, a, data, scale, bits, n)), (tier, xv)
        assert got[0, 0].item() == float(2 * 32 * xv * qmax) * 1.0  # s = 1.0 exactly (absmax / Q)


def test_dense_lowbit_is_the_documented_sum():
    """The twin itself: exact int group sums, float32 sum over the groups in order, / a."""
    gen = torch.Generator().manual_seed(5)
    xq, a, data, scale = _case(gen, 4, 3, 21, 100)
    w, s = P.unpack_head(data, scale, 4, 21, 100)
    y = torch.zeros(3, 21)
    for g in range(4):
        ks = slice(32 * g, min(32 * g + 32, 100))
        acc = (xq[:, ks].long() @ w[:, ks].long().t()).to(torch.float32)
        y = y + acc * s[:, g]
    assert torch.equal(R.dense_lowbit_matmul(xq, a, data, scale, 4, 21), y / a.reshape(-1, 1))


def test_dense_lowbit_bad_input():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    gen = torch.Generator().manual_seed(0)
    xq, a, data, scale = _case(gen, 4, 2, 20, 64)
    for f in (native.dense_lowbit_matmul, R.dense_lowbit_matmul):
        with pytest.raises(ValueError, match="head data"):
            f(xq, a, data[:-1], scale, 4, 20)
        with pytest.raises(ValueError, match="head scale"):
            f(xq, a, data, scale.float(), 4, 20)
        with pytest.raises(ValueError, match="4 or 6 bits"):
            f(xq, a, data, scale, 5, 20)
        with pytest.raises(ValueError, match="head data"):
            f(xq, a, data, scale, 6, 20)  # an int4 head read as int6


# ---- engine ----------------------------------------------------------------------------------


def _model():
    return tiny_model("tiny-2b4t", sharpen=50, sharpen_head=False, max_seq_len=96)


@pytest.mark.parametrize("head", ("int6", "int4"))
def test_lowbit_head_engine_round_trip_and_decode(tmp_path, head):
    m = _model()
    pm = convert(m, "i2", head=head)
    assert pm.head.kind == head and pm.embed.kind == "int8" and pm.head is not pm.embed
    assert pm.head_act == "int8"
    ref8 = convert(m, "i2", head="int8")
    ref8.head_act = "int8"
    prompt = torch.randint(0, m.config.vocab_size, (1, 6))
    lo, hi = pm(prompt), ref8(prompt)
    # only the head differs from the W8A8 int8 head: logits close, same argmax nearly everywhere
    rel = ((lo - hi).norm() / hi.norm()).item()
    assert rel < (0.15 if head == "int4" else 0.04), rel
    path = save_packed(pm, tmp_path / "m.bitlm")
    back = load_packed(path)
    assert back.head.kind == head and back.head.shape == pm.head.shape
    assert torch.equal(back(prompt), lo)
    # fused decode (native) / per-op decode and batched decode give the same head bits per row
    cache = back.new_cache(1, 32)
    back(prompt, cache=cache, last_only=True)
    one = back(torch.tensor([[3]]), cache=cache)[0, -1]
    c2 = [back.new_cache(1, 32) for _ in range(2)]
    for c in c2:
        back(prompt, cache=c, last_only=True)
    back.fused_decode = False
    batch = back.decode_batch([3, 3], c2)
    assert torch.equal(batch[0], batch[1])
    assert torch.allclose(batch[0], one, rtol=1e-4, atol=1e-3 * one.abs().max().item())


def test_lowbit_head_is_smaller():
    m = _model()
    sizes = {h: convert(m, "i2", head=h).head.nbytes for h in ("int8", "int6", "int4")}
    v, d = m.config.vocab_size, m.config.d_model
    assert sizes["int8"] == v * d + 4 * v
    assert sizes["int6"] == v * d * 6.5 / 8 and sizes["int4"] == v * d * 4.5 / 8  # tiny-2b4t: whole tiles / groups


def test_lowbit_head_bad_input(tmp_path):
    m = _model()
    with pytest.raises(ValueError, match="--embed int4"):
        convert(m, "i2", head="int8", embed="int4")
    with pytest.raises(ValueError, match="--head int3"):
        convert(m, "i2", head="int3")
    pm = convert(m, "i2", head="int4")
    with pytest.raises(ValueError, match="head_act='f32'"):
        pm.head_act = "f32"
    with pytest.raises(ValueError, match="output head only"):
        pm.head.rows(torch.tensor([1]))
    with pytest.raises(ValueError, match="must be one of"):
        Dense("int5", torch.zeros(1))
    # a file whose head group size is not this reader's
    import json

    from bitlm.io.packed import read_packed, write_packed

    path = save_packed(pm, tmp_path / "m.bitlm")
    header, tensors, mm = read_packed(path, True)
    meta = {k: v for k, v in header.items() if k not in ("tokenizer", "tensors", "data_bytes")}
    meta["head_group"] = 64
    tensors = {k: v.clone() for k, v in tensors.items()}
    del mm
    write_packed(tmp_path / "g64.bitlm", json.loads(json.dumps(meta)), tensors)
    with pytest.raises(PackedFormatError, match="group size 64"):
        load_packed(tmp_path / "g64.bitlm")


def test_pack_head_in_row_blocks_is_the_same_packing():
    """Heads taller than one block (8192 rows) are packed block by block: same codes and scales."""
    gen = torch.Generator().manual_seed(9)
    wf = torch.randn(8192 + 40, 40, generator=gen)
    data, scale = P.pack_head(wf, 4)
    assert (data.numel(), scale.numel()) == P.head_nbytes(4, 8232, 40)
    w, s = P.unpack_head(data, scale, 4, 8232, 40)
    s_want = (torch.nn.functional.pad(wf, (0, 24)).view(8232, 2, 32).abs().amax(-1) / 7).to(torch.float16).float()
    assert torch.equal(s, s_want)
    sg = s.repeat_interleave(32, dim=1)[:, :40]
    assert torch.equal(w.float(), torch.round(wf / sg).clamp(-7, 7))
