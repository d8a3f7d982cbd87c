"""Group quantisation and normalisation (2310.11453 Eq. 13-15) downstream of training: packed
K-slices, grouped activation quantisers and grouped norms in the kernels and the packed engine —
native equal to the reference on every tier, the packed model equal to the torch model, the
packed file round trip, and the blockers that remain."""

from __future__ import annotations

import pytest
import torch

import bitlm.kernels as K
from bitlm import packing as P
from bitlm import quant as Q
from bitlm.engine import PackedBitLinear, PackedFormatError, convert, load_packed, save_packed
from bitlm.generate import generate_tokens
from bitlm.kernels import native
from bitlm.kernels import reference as R
from bitlm.layers import BitLinear
from bitlm.model import inference_blockers
from helpers import tiny_model

#: tensor-parallel `group` mode (issue 12): what a TP-trained model carries
TP_GROUP = dict(weight_groups=2, weight_group_dim="parallel", act_groups=2, norm_groups=2, group_scope="parallel")
#: every group option everywhere, with groups that differ between weights, activations and norms
ALL_MIXED = dict(weight_groups=4, weight_group_dim="in", act_groups=2, norm_groups=4, group_scope="all")
OUT_ROWS = dict(weight_groups=2, weight_group_dim="out", act_groups=4, norm_groups=4, group_scope="all")
GROUPINGS = {"tp": TP_GROUP, "all-in": ALL_MIXED, "all-out": OUT_ROWS}
ARCHS = [("tiny", "i2"), ("tiny", "t1"), ("tiny-2b4t", "i2"), ("tiny-2b4t", "t1"), ("tiny-bitnet", "b1")]


def _tiers() -> list[str]:
    return native.supported_tiers() if native.load() is not None else []


@pytest.fixture(params=_tiers() or ["reference"])
def any_tier(request):
    """Every native tier, or the reference backend alone where the library is unavailable."""
    if request.param == "reference":
        yield request.param
        return
    prev = native.tier()
    native.set_tier(request.param)
    yield request.param
    native.set_tier(prev)


def grouped(name, grouping, **kw):
    return tiny_model(name, sharpen=50, max_seq_len=96, **GROUPINGS[grouping], **kw)


# --- packing: K-slices ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["i2", "t1", "b1"])
@pytest.mark.parametrize("k,g", [(64, 4), (96, 2), (60, 3)])  # K/G = 16, 48, 20: on and off every block
def test_k_sliced_weight_round_trip(fmt, k, g):
    torch.manual_seed(0)
    w = torch.randn(40, k)
    pw = P.quantize_and_pack(w, fmt, groups=g, dim="in")
    t, s = Q.weight_quantize(w, "b1.58" if fmt != "b1" else "b1", g, "in")
    assert pw.k_groups == g and pw.groups == 1 and torch.equal(pw.scale, s)
    assert torch.equal(pw.unpack(), t)
    assert torch.equal(pw.dequantize(), Q.dequantize_weight(t, s, dim="in"))
    assert len(pw.slices()) == g and all(sl.K == k // g for sl in pw.slices())
    if fmt != "b1":  # ternary ↔ ternary format change keeps the slices
        other = pw.to_format("t1" if fmt == "i2" else "i2")
        assert other.k_groups == g and torch.equal(other.unpack(), t)
    with pytest.raises(ValueError, match="not divisible into k_groups=7"):
        P.PackedWeight(fmt, 1, 40, k, pw.data, pw.scale, 1, 7)


def test_slice_scales_table():
    s = torch.tensor([1.0, 2.0])
    assert P.slice_scales(s, "out", 3).tolist() == [1, 2, 1, 2, 1, 2]
    assert P.slice_scales(s, "in", 4).tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="do not divide"):
        P.slice_scales(s, "in", 3)


# --- kernels: grouped quantiser and sliced matmul, native == reference on every tier ----------


@pytest.mark.parametrize("fmt", ["i2", "t1", "b1"])
def test_sliced_matmul_bit_identical(tier, fmt):
    gen = torch.Generator().manual_seed(1)
    alpha = torch.tensor(P.get_format(fmt).alphabet, dtype=torch.int8)
    for m, n, k, gk, ga, rg in [(1, 48, 96, 2, 2, 1), (7, 33, 120, 6, 3, 3), (5, 64, 64, 4, 1, 2), (3, 16, 40, 2, 2, 1)]:
        t = alpha[torch.randint(len(alpha), (n, k), generator=gen)]
        scale = torch.rand(gk * rg, generator=gen) + 0.05
        w = P.pack_weight(t, scale, fmt, rg, gk)
        xq = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        a = torch.rand(m, ga, generator=gen) + 0.1
        bias = torch.randn(n, generator=gen)
        got = K.matmul(xq, a, w, bias)
        want = R.matmul(xq, a, w, bias)
        assert torch.equal(got, want), (tier, fmt, m, n, k, gk, ga)
        assert torch.equal(K.gemm(xq, w), R.gemm(xq, w))
        # the definition: slice j's epilogue with its own scales, summed in slice order
        kk, per = k // gk, gk // ga
        y = None
        for j in range(gk):
            acc = (xq[:, j * kk:(j + 1) * kk].double() @ t[:, j * kk:(j + 1) * kk].double().t()).float()
            f = scale[j * rg:(j + 1) * rg].reshape(1, rg) / a[:, j // per].reshape(m, 1)
            yj = acc * f.repeat_interleave(n // rg, dim=1)
            y = yj if y is None else y + yj
        assert torch.equal(want, y + bias)


def test_sliced_matmul_refuses_misfit_groups():
    w = P.pack_weight(torch.zeros(16, 64, dtype=torch.int8), torch.ones(2), "i2", 1, 2)
    with pytest.raises(ValueError, match="3 activation groups do not fit"):
        R.matmul(torch.zeros(2, 64, dtype=torch.int8), torch.ones(2, 3), w)


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_quantize_rows_bit_identical(tier, groups):
    torch.manual_seed(groups)
    x = torch.randn(9, 96) * torch.linspace(0.1, 8, 96)
    nw = torch.rand(96) + 0.5
    for args, kw in [((), {}), ((nw, 1e-5), {}), ((None, 1e-6), {"rmsnorm": True})]:
        q1, a1 = K.quantize_rows(x, *args, groups=groups, **kw)
        q2, a2 = R.quantize_rows(x, *args, groups=groups, **kw)
        assert a1.shape == (9, groups) and torch.equal(q1, q2) and torch.equal(a1, a2)
    # without a norm: bitlm.quant's grouped absmax quantiser, bit for bit
    q, a = Q.activation_quantize(x, 8, "token", groups)
    q1, a1 = K.quantize_rows(x, groups=groups)
    assert torch.equal(q1, q.to(torch.int8)) and torch.equal(a1, a)
    # the norm alone, then the quantiser: the same bits as fused; close to the torch model's norm
    h = R.rms_norm_rows(x, nw, 1e-5, groups)
    assert torch.equal(K.quantize_rows(h, groups=groups)[0], K.quantize_rows(x, nw, 1e-5, groups=groups)[0])
    assert torch.allclose(h, Q.group_rms_norm(x, groups) * nw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm", [None, "rmsnorm"])
@pytest.mark.parametrize("dim", ["in", "out"])
def test_packed_bitlinear_with_groups_equals_bitlinear(norm, dim):
    torch.manual_seed(0)
    lin = BitLinear(96, 48, norm=norm, weight_groups=3, weight_group_dim=dim, act_groups=2)
    x = torch.randn(5, 96) * 3
    with torch.no_grad():
        ref = lin(x)
    p = PackedBitLinear.from_bitlinear(lin, "t1")
    assert p.w.k_groups == (6 if dim == "in" else 2)
    out = p(x)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


# --- the packed engine ------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("name,fmt", ARCHS)
def test_grouped_packed_logits_match_torch(name, fmt, grouping):
    m = grouped(name, grouping)
    assert inference_blockers(m.config) == []
    pm = convert(m, fmt)
    pm.kv = "f32"  # the torch model's float32 keys / values (f16 KV: tests/test_kv.py)
    ids = torch.randint(0, m.config.vocab_size, (3, 24))
    with torch.no_grad():
        ref = m(ids)
    out = pm(ids)
    # as test_engine's ungrouped test: same integers, float order around them differs
    err = (out - ref).abs() / ref.abs().max()
    assert (err < 1e-5).float().mean() > 0.9, err.max()
    assert err.max() < 0.02
    # the grouping really is computed: the ungrouped model is a different function
    ungrouped = tiny_model(name, sharpen=50, max_seq_len=96)
    with torch.no_grad():
        assert not torch.allclose(ungrouped(ids), ref, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("name,fmt", ARCHS)
def test_grouped_packed_greedy_equals_torch(any_tier, name, fmt):
    m = grouped(name, "tp")
    pm = convert(m, fmt)
    assert not pm._fused_decode_ok()  # grouped models decode on the per-op path
    prompt = [3, 14, 15, 92, 65]
    ref = list(generate_tokens(m, prompt, 48))
    assert list(generate_tokens(pm, prompt, 48)) == ref


@pytest.mark.parametrize("name,fmt", [("tiny", "t1"), ("tiny-2b4t", "i2"), ("tiny-bitnet", "b1")])
def test_grouped_engine_native_equals_reference_every_tier(tier, name, fmt, monkeypatch):
    pm = convert(grouped(name, "all-in"), fmt)
    ids = torch.randint(0, pm.config.vocab_size, (2, 12))
    got = pm(ids)
    batch = pm.decode_batch([5, 7], [pm.new_cache(1, 8), pm.new_cache(1, 8)])
    monkeypatch.setenv("BITLM_BACKEND", "reference")
    assert torch.equal(got, pm(ids)), tier
    assert torch.equal(batch, pm.decode_batch([5, 7], [pm.new_cache(1, 8), pm.new_cache(1, 8)])), tier


def test_grouped_packed_file_round_trip(tmp_path):
    pm = convert(grouped("tiny-2b4t", "tp"), "t1")
    path = save_packed(pm, tmp_path / "g.bitlm")
    pm2 = load_packed(path)
    assert pm2.layers[0].o.k_groups == 2 and pm2.layers[0].q.k_groups == 1 and pm2.layers[0].q.groups == 2
    assert pm2.config.group_scope == "parallel" and pm2.config.weight_group_dim == "parallel"
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(pm2(ids), pm(ids))
    # a file whose packs disagree with its config's groups is refused, naming the tensor
    import bitlm.engine as E

    tensors, packs = E._tensor_table(pm)
    packs["layers.1.down"].pop("k_groups")
    from bitlm.io.packed import write_packed

    meta = {"model": pm.config.to_dict(), "format": pm.format, "embed": pm.embed.kind, "head": pm.head.kind,
            "tied_head": True, "packs": packs}
    write_packed(tmp_path / "bad.bitlm", meta, tensors)
    with pytest.raises(PackedFormatError, match=r"layers\.1\.down.*k_groups=1.*expect 2"):
        load_packed(tmp_path / "bad.bitlm")


def test_blockers_left():
    m = grouped("tiny", "all-in")
    assert inference_blockers(m.config) == []
    gg = inference_blockers(m.config, "GGUF")
    assert any(b.startswith("norm_groups=4") for b in gg) and any(b.startswith("act_groups=2") for b in gg)
    assert inference_blockers(tiny_model("tiny", act_nonneg=True).config) != []


# --- one-scale-per-tensor formats: refuse, or re-quantise when asked -------------------------


def _tokenizer():
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    from bitlm.data import Tokenizer

    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["the cat sat on the mat. " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(backend)


def test_hf_export_refuses_groups_or_requantizes_reporting_the_loss(tmp_path, capsys):
    from bitlm.cli import main
    from bitlm.export import requantize
    from bitlm.io.checkpoint import save_checkpoint
    from bitlm.loading import load, save

    m = grouped("tiny-2b4t", "tp", vocab_size=512)
    ck = save_checkpoint(m, tmp_path / "ck", tokenizer=_tokenizer())
    with pytest.raises(ValueError, match=r"norm_groups=2: .*requantize"):
        save(m, tmp_path / "hf0", format="hf")
    only_weights = grouped("tiny-2b4t", "tp", vocab_size=512).config.replace(act_groups=1, norm_groups=1)
    from bitlm.model import BitNetModel

    with pytest.raises(ValueError, match=r"q_proj: weight_groups=2 .*requantize"):
        save(BitNetModel(only_weights), tmp_path / "hf0", format="hf")
    (tmp_path / "val.txt").write_text("the cat sat on the mat. the dog sat on the log. " * 60)
    assert main(["export", "--model", str(ck), "--format", "hf", "--out", str(tmp_path / "hf"), "--requantize",
                 "--val-data", str(tmp_path / "val.txt"), "--val-tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "requantized to one scale per tensor (was weight_groups=2" in out and "validation loss" in out, out
    back = load(tmp_path / "hf")
    assert back.config.weight_groups == back.config.act_groups == back.config.norm_groups == 1
    flat, report = requantize(m)
    assert "not measured" in report
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():  # the export is the requantised model (same ternary weights, one scale)
        assert torch.allclose(back(ids), flat(ids), atol=1e-4 * flat(ids).abs().max().item())
    # the library option: bitlm.save(..., requantize=True) prints the report with the loss
    save(m, tmp_path / "hf2", format="hf", requantize=True, val_tokens=list(range(3, 200)))
    assert "validation loss" in capsys.readouterr().out
    assert requantize(flat)[0] is flat  # nothing grouped: unchanged


def test_grouped_checkpoint_packs_and_generates_from_the_cli(tmp_path, capsys):
    from bitlm.cli import main
    from bitlm.io.checkpoint import save_checkpoint
    from bitlm.io.packed import read_header

    ck = save_checkpoint(grouped("tiny-2b4t", "tp", vocab_size=512), tmp_path / "ck", tokenizer=_tokenizer())
    assert main(["pack", "--model", str(ck), "--out", str(tmp_path / "g.bitlm"), "--format", "t1"]) == 0
    packs = read_header(tmp_path / "g.bitlm")["packs"]
    assert packs["layers.0.o"]["k_groups"] == 2 and "k_groups" not in packs["layers.0.q"]  # old files: no key
    capsys.readouterr()
    texts = []
    for model in (tmp_path / "g.bitlm", ck):
        assert main(["generate", "--model", str(model), "--prompt", "the cat", "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("the cat")
    assert main(["info", "--model", str(tmp_path / "g.bitlm")]) == 0
