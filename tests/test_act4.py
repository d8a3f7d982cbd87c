"""4-bit activations: BitNet a4.8 (absmean INT4, top-K INT8) and BitNet v2 (H-BitLinear) —
the reference math in bitlm.quant (hand-computed), BitLinear / ModelConfig wiring, checkpoints,
and the 8-bit → 4-bit recipe (``bitlm train --init-from CKPT --act-variant``)."""

import math

import pytest
import torch

import bitlm.quant as Q
from bitlm.config import ACT_VARIANTS, ConfigError, ModelConfig, preset
from bitlm.layers import BitLinear
from bitlm.model import BitNetModel, inference_blockers
from helpers import tiny_config


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


# ---------------------------------------------------------------------------------------------
# 4-bit absmean (a4.8 Eq. 7, v2 Eq. 6)
# ---------------------------------------------------------------------------------------------


def test_absmean_int4_rounding_ties_and_clip_by_hand():
    s = torch.tensor(math.sqrt(7), dtype=torch.float32)  # β = float32(√7) exactly → a = √7/β = 1
    r = 4 * s - 4.5  # exact in float32: mean|x| of the token below is exactly s
    x = torch.stack([torch.tensor([2.5, -0.5, 1.5, 0.0]) + torch.tensor([0, 0, 0, 1.0]) * r,
                     torch.tensor([100.0, 0, 0, 0]), torch.tensor([-100.0, 0, 0, 0]), torch.zeros(4)])
    q, a = Q.activation_quantize_absmean(x)
    assert a[0].item() == 1.0
    # ties to even: 2.5 → 2, -0.5 → -0, 1.5 → 2; 6.08 → 6
    assert q[0].tolist() == [2.0, -0.0, 2.0, 6.0]
    # β = 25, x·a = 100·√7/25 = 10.58 → clipped to +7; the negative end clips at -8 (asymmetric, as printed)
    assert q[1].tolist() == [7.0, 0, 0, 0] and q[2].tolist() == [-8.0, 0, 0, 0]
    assert a[1].item() == pytest.approx(math.sqrt(7) / 25)
    assert q[3].tolist() == [0.0] * 4 and a[3].item() == pytest.approx(math.sqrt(7) / Q.SCALE_EPS)  # β clamped


def test_absmean_int4_zero_fraction_matches_the_paper():
    # a4.8 §1.2 (derived) / Table 2: ~12.0 % of a Gaussian rounds to 0 (P(|x| < 0.5·β/√7)), 12.0-12.1 % reported
    torch.manual_seed(0)
    q, _ = Q.activation_quantize_absmean(torch.randn(64, 4096))
    zero = (q == 0).float().mean().item()
    assert 0.115 < zero < 0.125, zero
    assert q.min() >= -8 and q.max() <= 7


def test_absmean_ste_gradient_is_identity():
    x = torch.randn(3, 16, requires_grad=True)
    y = Q.fake_quant_activation_absmean(x)
    q, a = Q.activation_quantize_absmean(x.detach())
    assert torch.equal(y.detach(), q / a.unsqueeze(-1))
    (y * torch.arange(16.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(16.0).expand(3, 16))


# ---------------------------------------------------------------------------------------------
# Top-K (a4.8 Eq. 1, Q-Sparse Eq. 13)
# ---------------------------------------------------------------------------------------------


def test_topk_mask_by_hand_with_ties():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5, -0.2, 1.0],
                      [1.0, -1.0, 1.0, -1.0, 0.0, 0.0]])  # ties: the lower index wins
    m = Q.topk_mask(x, 0.5)
    assert m.tolist() == [[False, True, True, False, False, True], [True, True, True, False, False, False]]
    assert Q.topk_mask(x[:, :5], 0.5).sum(-1).tolist() == [2, 2]  # K = ⌊0.5·5⌋
    assert Q.topk_mask(x, 1.0).all()
    with pytest.raises(ValueError, match="top-K fraction"):
        Q.topk_mask(x, 0.0)


def test_topk_mask_equals_a_stable_sort_on_tie_heavy_data():
    torch.manual_seed(2)
    x = torch.randint(-4, 5, (50, 24)).float()  # many ties at every threshold
    for frac in (0.25, 0.5, 0.75):
        k = int(24 * frac)
        idx = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[:, :k]
        want = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
        assert torch.equal(Q.topk_mask(x, frac), want), frac


def test_topk_fake_quant_is_int8_of_the_kept_half_and_ste_keeps_masked_gradients():
    torch.manual_seed(1)
    x = torch.randn(4, 64, requires_grad=True)
    y = Q.fake_quant_activation_topk(x, 8, 0.5)
    q, a = Q.activation_quantize(x.detach(), 8)
    keep = Q.topk_mask(x, 0.5)
    assert torch.equal(y.detach(), torch.where(keep, q / a, torch.zeros(())))
    assert ((y != 0).sum(-1) == 32).all()  # exactly 50 % kept (Table 2: Out sparsity 50.0 %)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 64))  # not zeroed where masked (Q-Sparse Eq. 13)


# ---------------------------------------------------------------------------------------------
# Hadamard (v2 Eq. 3-4, 8)
# ---------------------------------------------------------------------------------------------


def test_hadamard_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # H_2 = [[1,1,1,1],[1,-1,1,-1],[1,1,-1,-1],[1,-1,-1,1]] / 2
    assert torch.equal(Q.hadamard_transform(x), torch.tensor([5.0, -1.0, -2.0, 0.0]))
    x2 = torch.tensor([3.0, 1.0])
    assert torch.allclose(Q.hadamard_transform(x2), torch.tensor([4.0, 2.0]) / math.sqrt(2))


@pytest.mark.parametrize("n", [1, 2, 8, 64, 256])
def test_hadamard_is_the_orthonormal_sylvester_matrix(n):
    eye = torch.eye(n)
    h = Q.hadamard_transform(eye)  # rows: H e_i = column i of H (H symmetric)
    assert torch.allclose(h, sylvester(n) / math.sqrt(n), atol=1e-6)
    assert torch.allclose(h @ h.t(), eye, atol=1e-5)  # orthogonal
    x = torch.randn(5, n)
    assert torch.allclose(Q.hadamard_transform(Q.hadamard_transform(x)), x, atol=1e-5)  # self-inverse


@pytest.mark.parametrize("n,block", [(192, 64), (160, 32), (2560, 512), (6912, 256), (7, 1)])
def test_hadamard_non_power_of_two_is_block_diagonal(n, block):
    assert Q.hadamard_block(n) == block
    torch.manual_seed(0)
    x = torch.randn(3, n)
    y = Q.hadamard_transform(x)
    ref = (x.reshape(3, n // block, block) @ (sylvester(block) / math.sqrt(block)).t()).reshape(3, n)
    assert torch.allclose(y, ref, atol=1e-4)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # orthogonal
    assert torch.allclose(Q.hadamard_transform(y), x, atol=1e-5)


def test_hadamard_gradient_is_the_transform_eq8():
    x = torch.randn(2, 32, requires_grad=True)
    g = torch.randn(2, 32)
    Q.hadamard_transform(x).backward(g)
    assert torch.allclose(x.grad, Q.hadamard_transform(g), atol=1e-6)


def test_hadamard_spreads_an_outlier():
    x = torch.zeros(64)
    x[5] = 8.0
    y = Q.hadamard_transform(x)
    assert torch.allclose(y.abs(), torch.full((64,), 1.0))  # one spike → flat: why 4 bits work after it


# ---------------------------------------------------------------------------------------------
# BitLinear options and the model variants
# ---------------------------------------------------------------------------------------------


def test_bitlinear_hadamard_absmean_forward_is_the_composition():
    torch.manual_seed(0)
    lin = BitLinear(32, 8, act_bits=4, act_quant="absmean", hadamard=True)
    x = torch.randn(3, 32)
    q, a = Q.activation_quantize_absmean(Q.hadamard_transform(x))
    t, s = lin.quantized_weight()
    ref = (q / a.unsqueeze(-1)) @ (t.float() * s).t()
    assert torch.allclose(lin(x), ref, atol=1e-5)
    lin2 = BitLinear(32, 8, act_topk=0.5)
    xq = Q.fake_quant_activation_topk(x, 8, 0.5)
    t, s = lin2.quantized_weight()
    assert torch.allclose(lin2(x), xq @ (t.float() * s).t(), atol=1e-5)


@pytest.mark.parametrize("kw,match", [
    (dict(act_quant="absmin"), "act_quant"), (dict(act_topk=1.5), "act_topk"),
    (dict(act_quant="absmean", act_groups=2), "per token"), (dict(act_topk=0.5, act_nonneg=True), "per token"),
    (dict(act_quant="absmean", act_topk=0.5), "act_topk"),
])
def test_bitlinear_rejects_bad_activation_options(kw, match):
    with pytest.raises(ValueError, match=match):
        BitLinear(32, 8, **kw)


def _site_options(m: BitNetModel) -> dict[str, tuple]:
    blk = m.model.layers[0]
    mods = {"qkv": blk.self_attn.q_proj, "k": blk.self_attn.k_proj, "o": blk.self_attn.o_proj,
            "ffn_in": blk.mlp.up_proj, "down": blk.mlp.down_proj}
    if hasattr(blk.mlp, "gate_proj"):
        mods["gate"] = blk.mlp.gate_proj
    return {k: (v.act_bits, v.act_quant, v.act_topk, v.hadamard) for k, v in mods.items()}


def test_variants_set_each_projection_as_the_papers_do():
    a8 = _site_options(BitNetModel(tiny_config(act_variant="a8")))
    assert set(a8.values()) == {(8, "absmax", None, False)}
    a48 = _site_options(BitNetModel(tiny_config(act_variant="a4.8")))
    assert a48["qkv"] == a48["k"] == a48["ffn_in"] == a48["gate"] == (4, "absmean", None, False)
    assert a48["o"] == (8, "absmax", 0.5, False) and a48["down"] == (8, "absmax", None, False)
    v2 = _site_options(BitNetModel(tiny_config("tiny-2b4t", act_variant="v2-a4")))
    assert v2["o"] == v2["down"] == (4, "absmean", None, True) and v2["qkv"] == (4, "absmean", None, False)
    v28 = _site_options(BitNetModel(tiny_config(act_variant="v2-a8")))
    assert v28["o"] == v28["down"] == (8, "absmax", None, True) and v28["gate"] == (8, "absmax", None, False)
    assert set(ACT_VARIANTS) == {"a8", "a4.8", "v2-a8", "v2-a4"}


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t", "tiny-bitnet"])
@pytest.mark.parametrize("variant", ["a4.8", "v2-a4"])
def test_variant_models_train_and_differ_from_a8(name, variant):
    extra = {"act_granularity": "token"} if name == "tiny-bitnet" else {}
    torch.manual_seed(0)
    base = BitNetModel(tiny_config(name, **extra))
    m = BitNetModel(tiny_config(name, act_variant=variant, **extra))
    m.load_state_dict(base.state_dict())  # no new parameters: the same tensors load
    ids = torch.randint(0, 64, (2, 16))
    y = m(ids)
    assert not torch.allclose(y, base(ids))
    y.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "proj" in n)


def test_config_validation_and_old_files():
    with pytest.raises(ConfigError, match="unknown act_variant"):
        preset("tiny", act_variant="a2")
    with pytest.raises(ConfigError, match="quant='fp'"):
        preset("tiny", quant="fp", act_variant="a4.8")
    with pytest.raises(ConfigError, match="act_bits=8"):
        preset("tiny", act_bits=6, act_variant="v2-a4")
    with pytest.raises(ConfigError, match="act_groups"):
        preset("tiny", act_groups=2, act_variant="a4.8")
    with pytest.raises(ConfigError, match="per token"):
        preset("tiny-bitnet", act_variant="a4.8")  # b1 trains per tensor by default
    d = preset("tiny").to_dict()
    del d["act_variant"]  # a file written before the field existed
    assert ModelConfig.from_dict(d).act_variant == "a8"
    assert ModelConfig.from_dict(preset("tiny", act_variant="v2-a4").to_dict()).act_variant == "v2-a4"


def test_checkpoint_records_the_variant(tmp_path):
    from bitlm.io.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    m = BitNetModel(tiny_config(act_variant="a4.8")).eval()
    save_checkpoint(m, tmp_path / "ck")
    back, _ = load_checkpoint(tmp_path / "ck")
    assert back.config.act_variant == "a4.8"
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(back.eval()(ids), m(ids))


def test_exports_refuse_the_4bit_variants_the_packed_engine_runs_them(tmp_path):
    from bitlm.engine import pack
    from bitlm.loading import save

    m = BitNetModel(tiny_config(act_variant="v2-a4")).eval()
    assert any("act_variant='v2-a4'" in b for b in inference_blockers(m.config, "GGUF"))
    assert not inference_blockers(m.config)
    assert pack(m).config.act_variant == "v2-a4"
    for fmt in ("hf", "gguf"):
        with pytest.raises(ValueError, match="act_variant='v2-a4'"):
            save(m, tmp_path / f"out-{fmt}", format=fmt)
    assert not (tmp_path / "out-hf").exists()


# ---------------------------------------------------------------------------------------------
# The recipe: 8-bit first, then --init-from with the 4-bit variant switched on
# ---------------------------------------------------------------------------------------------


def test_switch_act_variant_copies_every_weight_and_checks_shapes():
    from bitlm.train import switch_act_variant

    torch.manual_seed(0)
    a8 = BitNetModel(tiny_config())
    new = switch_act_variant(a8, "v2-a4", "ck")
    assert new.config.act_variant == "v2-a4" and new.config.replace(act_variant="a8") == a8.config
    for (k, v), (k2, v2) in zip(a8.state_dict().items(), new.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert new.model.layers[0].mlp.down_proj.hadamard
    with pytest.raises(ConfigError, match="--act-variant nope"):
        switch_act_variant(a8, "nope")
    a8.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 100))
    with pytest.raises(ValueError, match=r"ck: --act-variant a4.8: tensor model.layers.0.mlp.down_proj.weight"):
        switch_act_variant(a8, "a4.8", "ck")


def test_cli_recipe_a8_then_a4(tmp_path, monkeypatch):
    from bitlm.cli import main
    from bitlm.io.checkpoint import load_checkpoint

    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran to the cat. " * 200)
    common = ["--data", str(text), "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    assert main(["train", "--preset", "tiny", "--set", "max_seq_len=32", *common, "--max-steps", "3",
                 "--out", str(tmp_path / "a8")]) == 0
    stage1, _ = load_checkpoint(tmp_path / "a8" / "last")
    assert stage1.config.act_variant == "a8"
    assert main(["train", "--init-from", str(tmp_path / "a8" / "last"), "--act-variant", "a4.8", *common,
                 "--max-steps", "2", "--lr", "0", "--out", str(tmp_path / "a48")]) == 0
    stage2, meta = load_checkpoint(tmp_path / "a48" / "last")
    assert stage2.config.act_variant == "a4.8" and meta["step"] == 2  # a fresh run: steps (and optimizer) from 0
    assert stage2.config.replace(act_variant="a8") == stage1.config
    assert stage2.model.layers[0].self_attn.o_proj.act_topk == 0.5
    for k, v in stage1.state_dict().items():  # lr 0: stage 2 still holds exactly stage 1's weights
        assert torch.equal(v, stage2.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------
# bitlm experiment activations (end to end, tiny)
# ---------------------------------------------------------------------------------------------


@pytest.mark.network  # trains on the default corpus (downloaded on first use), as tests/test_experiments.py
def test_experiment_activations(tmp_path):
    import json

    from bitlm.data import prepare_data
    from bitlm.experiments import Setup, run_experiment

    s = Setup.build("activations", quick=True)
    s.steps, s.val_tokens, s.limit, s.tasks = 4, 300, 2, ("piqa",)
    run_experiment("activations", s, tmp_path, progress=False, data=prepare_data("default", vocab_size=2048))
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["key"] for r in res["rows"]] == ["fp", "a8", "a4.8", "v2-a4"]
    assert [(r["stage1_steps"], r["stage2_steps"]) for r in res["rows"]] == [(4, 0), (3, 1), (3, 1), (3, 1)]
    rows = {r["key"]: r for r in res["rows"]}
    assert rows["a4.8"]["sparsity"]["o"] == pytest.approx(0.5, abs=0.01)  # top-K 50 % on o_proj
    assert 0.05 < rows["a4.8"]["sparsity"]["qkv"] < 0.25  # INT4 absmean: ~12 % zeros on Gaussian-like inputs
    assert rows["a8"]["sparsity"]["o"] < 0.2
    assert all(r["val_ppl"] > 1 for r in res["rows"])
    assert (tmp_path / "activations_loss.png").stat().st_size > 1000
    assert "BitNet a4.8" in (tmp_path / "results.md").read_text()


def test_packing_refuses_a_4bit_variant_with_group_quantisation():
    """The engine's 4-bit / Hadamard path normalises each token as one group: a model that also
    asks for norm groups or input-column weight groups must be refused, not packed with its groups
    dropped (the config already refuses act_groups with a variant)."""
    from bitlm.engine import pack

    for kw in (dict(norm_groups=2), dict(weight_groups=2, weight_group_dim="in")):
        m = BitNetModel(tiny_config(act_variant="a4.8", **kw)).eval()
        with pytest.raises(ValueError, match="ungrouped only"):
            pack(m)
    assert pack(BitNetModel(tiny_config(act_variant="a4.8", weight_groups=2)).eval()).config.weight_groups == 2
