"""BitLinear, prepare(), the three architectures, and KV-cache equivalence."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bitlm import quant as Q
from bitlm.config import ConfigError, ModelConfig, build_config, preset
from bitlm.layers import BitLinear, prepare, set_quant_lambda
from bitlm.model import BitNetModel, linear_modules


def test_bitlinear_forward_matches_formula():
    torch.manual_seed(0)
    lin = BitLinear(16, 8, weight_quant="b1.58")
    x = torch.randn(3, 16)
    tq, s = Q.ternary_quantize(lin.weight)
    q, a = Q.activation_quantize(x)
    # y = (T q) · s / a : the integer matmul then one rescale
    expect = (q @ tq.float().T) * s / a
    assert torch.allclose(lin(x), expect, atol=1e-5)


def test_bitlinear_b1_with_layernorm_matches_paper_eq11():
    torch.manual_seed(1)
    lin = BitLinear(12, 6, weight_quant="b1", norm="layernorm")
    x = torch.randn(4, 12) * 3 + 1
    tq, beta, _ = Q.binary_quantize(lin.weight)
    ln = F.layer_norm(x, (12,), eps=1e-5)
    q, a = Q.activation_quantize(ln)
    assert torch.allclose(lin(x), (q @ tq.float().T) * beta / a, atol=1e-5)


def test_bitlinear_gradients_reach_latent_weights():
    lin = BitLinear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bitlinear_rejects_bad_options():
    with pytest.raises(ValueError):
        BitLinear(8, 4, weight_quant="int4")
    with pytest.raises(ValueError):
        BitLinear(8, 6, weight_groups=4)
    with pytest.raises(ValueError):
        BitLinear(8, 4, norm="batchnorm")


def test_prepare_copies_weights_and_skips_head():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.body = nn.Sequential(nn.Linear(8, 8, bias=True), nn.ReLU(), nn.Linear(8, 8))
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.tied = nn.Linear(8, 10, bias=False)
            self.tied.weight = self.embed.weight

    net = Net()
    w0, b0 = net.body[0].weight.clone(), net.body[0].bias.clone()
    head = net.lm_head
    prepare(net, weight_quant="b1.58", norm="rmsnorm")
    assert isinstance(net.body[0], BitLinear) and isinstance(net.body[2], BitLinear)
    assert torch.equal(net.body[0].weight, w0) and torch.equal(net.body[0].bias, b0)  # copied, not re-initialised
    assert net.lm_head is head and type(net.lm_head) is nn.Linear
    assert type(net.tied) is nn.Linear  # tied to the embedding
    assert net.body[0].norm == "rmsnorm"
    prepare(net)  # idempotent: a BitLinear is never re-wrapped
    assert torch.equal(net.body[0].weight, w0)


def test_quant_lambda_zero_is_the_float_layer():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4, bias=False)
    m = nn.Sequential(lin)
    x = torch.randn(2, 8)
    ref = lin(x)
    prepare(m)
    set_quant_lambda(m, 0.0)
    assert torch.allclose(m(x), ref, atol=1e-6)
    set_quant_lambda(m, 1.0)
    assert not torch.allclose(m(x), ref, atol=1e-3)
    with pytest.raises(ValueError):
        set_quant_lambda(m, 1.5)


@pytest.mark.parametrize("name", ["tiny", "tiny-2b4t", "tiny-bitnet"])
@pytest.mark.parametrize("quant", ["fp", "b1", "b1.58"])
def test_architectures_and_kv_cache_equivalence(name, quant):
    torch.manual_seed(0)
    cfg = preset(name, quant=quant)
    model = BitNetModel(cfg).eval()
    kinds = {type(m) for _, m in linear_modules(model)}
    assert kinds == ({nn.Linear} if quant == "fp" else {BitLinear})
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, :7], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(7, 20)]
    inc = torch.cat(parts, dim=1)
    assert full.shape == (2, 20, cfg.vocab_size)
    # identical math, different op order: equal to fp32 rounding (an int8 rounding tie can flip, hence atol)
    assert torch.allclose(full, inc, atol=2e-3), (full - inc).abs().max()
    assert torch.equal(full.argmax(-1), inc.argmax(-1))


def test_2b4t_structure():
    cfg = preset("2b4t")
    assert (cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim) == (2560, 6912, 30, 20, 5, 128)
    assert cfg.tie_embeddings and cfg.rope_theta == 500000.0
    small = preset("tiny-2b4t")
    m = BitNetModel(small)
    names = set(dict(m.named_parameters()))
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in names
    assert "model.layers.0.mlp.ffn_sub_norm.weight" in names
    assert m.lm_head.weight is m.model.embed_tokens.weight
    assert not any(n.endswith("bias") for n in names)


def test_relu2_ffn_is_squared_relu_gate():
    torch.manual_seed(0)
    cfg = preset("tiny-2b4t", quant="fp")
    mlp = BitNetModel(cfg).model.layers[0].mlp
    h = torch.randn(3, cfg.d_model)
    m = F.relu(mlp.gate_proj(h)) ** 2 * mlp.up_proj(h)
    assert torch.allclose(mlp(h), mlp.down_proj(mlp.ffn_sub_norm(m)), atol=1e-6)


def test_causality():
    torch.manual_seed(0)
    model = BitNetModel(preset("tiny")).eval()
    ids = torch.randint(0, 512, (1, 16))
    ids2 = ids.clone()
    ids2[0, 10:] = (ids2[0, 10:] + 1) % 512
    with torch.no_grad():
        a, b = model(ids), model(ids2)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_config_errors_and_overrides():
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown architecture"):
        ModelConfig(arch="mamba")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)
    cfg = build_config("tiny", overrides=["quant=b1", "d_model=128", "tie_embeddings=true", "n_kv_heads=2"])
    assert (cfg.quant, cfg.d_model, cfg.tie_embeddings, cfg.kv_heads) == ("b1", 128, True, 2)
    with pytest.raises(ConfigError, match="unknown field"):
        build_config("tiny", overrides=["width=3"])
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config("tiny", overrides=["d_model=wide"])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_sequence_longer_than_context_is_an_error():
    model = BitNetModel(preset("tiny"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 129, dtype=torch.long))


# -- b1 activation granularity: per tensor in training, per token at inference (item 14) ---------


def _act_probe(train_gran, eval_gran):
    lin = BitLinear(2, 2, weight_quant="fp", act_granularity=train_gran, act_granularity_eval=eval_gran)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(2))  # output = the fake-quantised activation itself
    return lin


def test_per_tensor_vs_per_token_hand_computed():
    x = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    lin = _act_probe("tensor", "token")
    # per tensor: γ = 4, a = 127/4 = 31.75; x·a = [[31.75, -63.5], [127, 15.875]] → [[32, -64], [127, 16]]
    per_tensor = torch.tensor([[32.0, -64.0], [127.0, 16.0]]) / 31.75
    # per token: row 0 γ = 2, a = 63.5 → [63.5, -127] → [64, -127] (ties to even); row 1 as above
    per_token = torch.tensor([[64.0 / 63.5, -127.0 / 63.5], [127.0 / 31.75, 16.0 / 31.75]])
    assert torch.allclose(lin.train()(x), per_tensor, atol=1e-6)
    assert torch.allclose(lin.eval()(x), per_token, atol=1e-6)


def test_b1_model_trains_per_tensor_and_evaluates_per_token():
    cfg = preset("tiny-bitnet", max_seq_len=16)
    assert cfg.quant == "b1" and cfg.train_act_granularity == "tensor" and cfg.act_granularity_eval == "token"
    assert preset("tiny").train_act_granularity == "token"  # b1.58: per token throughout
    torch.manual_seed(0)
    model = BitNetModel(cfg)
    lins = [m for _, m in linear_modules(model)]
    assert lins and all(m.act_granularity == "tensor" and m.act_granularity_eval == "token" for m in lins)
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        # per tensor couples the rows of a batch (one γ for all); per token does not
        assert not torch.equal(model.train()(x)[:1], model.train()(x[:1]))
        model.eval()
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)


def test_granularity_does_not_change_the_ste_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    grads = []
    for gran in ("tensor", "token"):
        lin = BitLinear(8, 4, weight_quant="b1", act_granularity=gran).train()
        with torch.no_grad():
            lin.weight.copy_(torch.linspace(-1, 1, 32).reshape(4, 8))
        xi = x.clone().requires_grad_(True)
        lin(xi).sum().backward()
        wq = Q.fake_quant_weight(lin.weight.detach(), "b1")
        assert torch.allclose(xi.grad, wq.sum(0).expand_as(xi))  # identity through the activation quantiser
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])


def test_old_configs_keep_their_granularity():
    old = preset("tiny-bitnet").to_dict()
    del old["act_granularity_eval"]
    old["act_granularity"] = "token"  # what every file written before the split stores
    cfg = ModelConfig.from_dict(old)
    assert cfg.train_act_granularity == "token" and cfg.act_granularity_eval == "token"
    old["act_granularity"] = "tensor"  # an old per-tensor model evaluated per tensor too
    cfg = ModelConfig.from_dict(old)
    assert cfg.train_act_granularity == "tensor" and cfg.act_granularity_eval == "tensor"
    lin = BitNetModel(cfg).model.layers[0].self_attn.q_proj
    assert lin.act_granularity_eval == "tensor"
    # a new config (no saved file) with only act_granularity set keeps the per-token evaluation
    assert build_config("tiny", overrides=["act_granularity=tensor"]).act_granularity_eval == "token"


# -- group quantisation / group norm / η variant wired into the model (item 15) -----------------


def test_group_norms_hand_computed():
    from bitlm.model import GroupLayerNorm, RMSNorm

    x = torch.tensor([[1.0, 3.0, 10.0, 14.0]])
    rms = RMSNorm(4, eps=0.0, groups=2)
    with torch.no_grad():
        rms.weight.copy_(torch.tensor([1.0, 2.0, 1.0, 2.0]))
    # group [1, 3]: mean square 5; group [10, 14]: mean square 148
    expect = torch.tensor([[1 / 5**0.5, 2 * 3 / 5**0.5, 10 / 148**0.5, 2 * 14 / 148**0.5]])
    assert torch.allclose(rms(x), expect)
    ln = GroupLayerNorm(4, eps=0.0, groups=2)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        ln.bias.fill_(0.5)
    # group [1, 3]: mean 2, var 1 → [-1, 1]; group [10, 14]: mean 12, var 4 → [-1, 1]
    assert torch.allclose(ln(x), torch.tensor([[-0.5, 2.5, -2.5, 4.5]]))


def test_group_options_reach_every_layer():
    cfg = preset("tiny-bitnet", weight_groups=2, weight_group_dim="parallel", act_groups=2, norm_groups=4,
                 act_nonneg=True)
    m = BitNetModel(cfg)
    blk = m.model.layers[0]
    att, mlp = blk.self_attn, blk.mlp
    assert att.q_proj.weight_group_dim == "out" and mlp.up_proj.weight_group_dim == "out"  # column-parallel
    assert att.o_proj.weight_group_dim == "in" and mlp.down_proj.weight_group_dim == "in"  # row-parallel
    assert att.q_proj.quantized_weight()[1].numel() == 2 and att.q_proj.act_groups == 2
    assert [n for n, lin in linear_modules(m) if lin.act_nonneg][:1] == ["model.layers.0.mlp.up_proj"]  # feeds GELU
    assert sum(lin.act_nonneg for _, lin in linear_modules(m)) == cfg.n_layers
    assert all(mod.groups == 4 for mod in (blk.input_layernorm, blk.post_attention_layernorm, att.attn_sub_norm,
                                           mlp.ffn_sub_norm))
    assert type(m.model.norm) is nn.LayerNorm  # the final norm (before the full-precision head) stays whole
    gated = BitNetModel(preset("tiny", act_nonneg=True)).model.layers[0].mlp
    assert gated.gate_proj.act_nonneg and not gated.up_proj.act_nonneg and not gated.down_proj.act_nonneg
    with pytest.raises(ConfigError, match="norm_groups=3"):
        preset("tiny", norm_groups=3)
    with pytest.raises(ConfigError, match="weight_group_dim"):
        preset("tiny", weight_group_dim="rows")


def test_group_scope_parallel_groups_only_the_row_parallel_inputs():
    """group_scope="parallel": γ groups and norm groups only where tensor parallelism splits the
    features (o/down inputs and the sub-norms before them); q/k/v/gate/up and the block norms whole."""
    for name in ("tiny", "tiny-bitnet", "tiny-2b4t"):
        cfg = preset(name, weight_groups=2, weight_group_dim="parallel", act_groups=2, norm_groups=2,
                     group_scope="parallel")
        m = BitNetModel(cfg)
        blk = m.model.layers[0]
        att, mlp = blk.self_attn, blk.mlp
        assert att.o_proj.act_groups == 2 and mlp.down_proj.act_groups == 2
        assert att.q_proj.act_groups == att.k_proj.act_groups == att.v_proj.act_groups == mlp.up_proj.act_groups == 1
        assert att.attn_sub_norm.groups == 2 and mlp.ffn_sub_norm.groups == 2
        assert getattr(blk.input_layernorm, "groups", 1) == 1 and getattr(blk.post_attention_layernorm, "groups", 1) == 1
        out = m(torch.randint(0, cfg.vocab_size, (1, 8)))
        assert torch.isfinite(out if isinstance(out, torch.Tensor) else out[0]).all()
    with pytest.raises(ConfigError, match="group_scope"):
        preset("tiny", group_scope="rows")


@pytest.mark.parametrize("name", ["tiny", "tiny-bitnet", "tiny-2b4t"])
def test_one_group_reproduces_the_ungrouped_model_exactly(name):
    x = torch.randint(0, 500, (2, 10))
    outs = []
    for kw in ({}, dict(weight_groups=1, weight_group_dim="parallel", act_groups=1, norm_groups=1, act_nonneg=False),
               dict(weight_group_dim="in")):
        torch.manual_seed(0)
        m = BitNetModel(preset(name, **kw))
        outs += [m.train()(x), m.eval()(x)]
    for i in (2, 4):
        assert torch.equal(outs[0], outs[i]) and torch.equal(outs[1], outs[i + 1])
    # RMSNorm(groups=1) is the LLaMA formula bit for bit
    from bitlm.model import RMSNorm

    h = torch.randn(3, 64)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(RMSNorm(64)(h), torch.ones(64) * ref)


def test_grouped_models_pack_or_refuse_naming_the_option(tmp_path):
    from bitlm.engine import convert
    from bitlm.io.hf import save_hf

    x = torch.randint(0, 500, (1, 9))
    for name in ("tiny", "tiny-2b4t", "tiny-bitnet"):  # output-row weight groups: packed exactly (gated FFNs too)
        torch.manual_seed(0)
        m = BitNetModel(preset(name, weight_groups=4)).eval()
        pm = convert(m)
        pm.kv = "f32"  # the torch model's float32 keys / values (f16 KV: tests/test_kv.py)
        with torch.no_grad():
            assert torch.allclose(pm(x), m(x), atol=1e-4), name
    for kw, option in ((dict(norm_groups=2), "norm_groups"), (dict(act_groups=2), "act_groups"),
                       (dict(weight_groups=2, weight_group_dim="parallel"), "weight_groups=2")):
        torch.manual_seed(0)  # the packed engine computes every group option (tests/test_groups_packed.py)
        m = BitNetModel(preset("tiny-2b4t", **kw)).eval()
        pm = convert(m)
        pm.kv = "f32"
        with torch.no_grad():
            assert torch.allclose(pm(x), m(x), atol=1e-4), kw
        with pytest.raises(ValueError, match=option):  # the HF BitNet graph does not
            save_hf(m, tmp_path / "hf")
    for kw, option in ((dict(act_nonneg=True), "act_nonneg"), (dict(act_granularity_eval="tensor"), "act_granularity_eval")):
        m = BitNetModel(preset("tiny-2b4t", **kw))
        with pytest.raises(ValueError, match=option):
            convert(m)
        with pytest.raises(ValueError, match=option):
            save_hf(m, tmp_path / "hf")


def test_saved_configs_store_the_resolved_granularity():
    cfg = preset("tiny-bitnet")
    assert cfg.act_granularity is None and cfg.to_dict()["act_granularity"] == "tensor"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a resumed run compares equal
    assert preset("tiny", act_granularity="token") == preset("tiny")
    assert preset("tiny-bitnet", act_granularity="token") != preset("tiny-bitnet")
    assert cfg.replace(quant="b1.58").train_act_granularity == "token"  # None follows the quant


def test_lora_effective_weight_follows_input_dim_groups():
    from bitlm.lora import _effective_weight

    torch.manual_seed(0)
    lin = BitLinear(8, 4, weight_groups=2, weight_group_dim="in")
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = F.linear(Q.fake_quant_activation(x), _effective_weight(lin))
        assert torch.allclose(lin.eval()(x), ref, atol=1e-6)  # the weight the forward multiplies by


def test_packed_bitlinear_refuses_what_it_cannot_pack():
    from bitlm.engine import PackedBitLinear

    with pytest.raises(ValueError, match="act_nonneg"):
        PackedBitLinear.from_bitlinear(BitLinear(8, 4, act_nonneg=True))
    PackedBitLinear.from_bitlinear(BitLinear(8, 4, weight_groups=2))  # output-row groups pack
    PackedBitLinear.from_bitlinear(BitLinear(8, 4, weight_groups=2, weight_group_dim="in"))  # as K-slices
