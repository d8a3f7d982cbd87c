"""bitlm.integrations.transformers: transformers' BitNet projections swapped for bitlm's packed
kernels — layer outputs against transformers' own layers, greedy generation equal to
transformers', refusals that leave the model untouched, and the registered ``bitlm`` method.

Tolerance: a swapped layer computes the same integers as transformers' layer and one float
epilogue in another order (~1e-7 relative); its activation scale ``(1/max|x|)·127`` may differ
from transformers' ``127/max|x|`` in the last bit, which rarely moves one activation across an
int8 rounding boundary (one quantisation step on that token).  So: most rows agree to fp32
rounding, every row within a few quantisation steps; generation must be token-for-token equal.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.integrations.bitnet import AutoBitLinear, BitLinear  # noqa: E402

from bitlm.integrations import transformers as BT  # noqa: E402
from test_hf import hf_cfg, write_hf_folder  # noqa: E402  (the offline tiny-checkpoint builders)

VARIANTS = [("packed", "bitlinear"), ("packed", "autobitlinear"), ("online", "autobitlinear")]


@pytest.fixture(scope="module", autouse=True)
def hf_env():
    """As tests/test_hf.py: eager transformers (its torch.compile'd helpers compute the same
    float32 math; compiling costs ~40 s on CPU), no accelerate import check, quiet logging."""
    from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    # torch's own patch(): MonkeyPatch's undo deletes the key from torch's config module, which
    # broke every later test that reads torch._dynamo.config.disable
    with pytest.MonkeyPatch.context() as mp, torch._dynamo.config.patch(disable=True):
        if importlib.util.find_spec("accelerate") is None:  # not an import: accelerate is no dependency
            mp.setattr(BitNetHfQuantizer, "validate_environment", lambda self, *a, **k: None)
        yield


def load(folder, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)


def bitnet_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (BitLinear, AutoBitLinear))]


def prompt(seed=1, n=10):
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfint")
    out = {(v, lc): write_hf_folder(root / f"{v}-{lc}", hf_cfg(), v, lc, seed=3) for v, lc in VARIANTS}
    out["fp"] = write_hf_folder(root / "fp", hf_cfg(), "fp", seed=3)  # no quantization_config
    return out


@pytest.mark.parametrize("variant,linear_class", VARIANTS)
def test_each_swapped_layer_computes_what_transformers_layer_computes(folders, variant, linear_class):
    model = load(folders[(variant, linear_class)])
    layers = bitnet_layers(model)
    assert len(layers) == 2 * 7
    swapped = dict(BT._prepare(model, "i2"))
    g = torch.Generator().manual_seed(0)
    worst, clean = 0.0, []
    for name, ref_layer in layers:
        x = torch.randn(64, ref_layer.in_features, generator=g) * 3
        with torch.no_grad():
            ref = ref_layer(x)
        got = swapped[name](x)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        rows = (got - ref).abs().amax(-1) / ref.abs().amax(-1)
        worst = max(worst, float(rows.max()))
        clean.append(rows < 1e-5)
    clean = torch.cat(clean).float().mean()
    assert clean >= 0.97, f"only {clean:.1%} of rows agree to float32 rounding"
    assert worst < 0.05, worst  # a rounding flip moves one activation by one int8 step


@pytest.mark.parametrize("variant,linear_class", VARIANTS)
def test_greedy_generation_equals_transformers(folders, variant, linear_class):
    model = load(folders[(variant, linear_class)])
    x = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = model(x).logits
    ref = [model.generate(prompt(s), max_new_tokens=32, do_sample=False, min_new_tokens=32) for s in range(3)]
    assert BT.accelerate(model) is model
    assert not bitnet_layers(model)
    assert sum(isinstance(m, BT.BitlmLinear) for m in model.modules()) == 14
    with torch.no_grad():
        got_logits = model(x).logits  # model(input_ids) unchanged
    rel = (got_logits - ref_logits).abs().amax(-1) / ref_logits.abs().max()
    assert float((rel < 1e-5).float().mean()) >= 0.9 and float(rel.max()) < 0.05
    for s in range(3):
        got = model.generate(prompt(s), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert got.shape == (1, 42)
        assert torch.equal(got, ref[s]), f"seed {s}: {got.tolist()} != {ref[s].tolist()}"


def test_static_cache_and_generation_config_work_after_the_swap(folders):
    model = load(folders[("packed", "bitlinear")])
    gc = transformers.GenerationConfig(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = model.generate(prompt(7), generation_config=gc)
    BT.accelerate(model)
    assert torch.equal(model.generate(prompt(7), generation_config=gc), ref)
    assert torch.equal(model.generate(prompt(7), generation_config=gc, cache_implementation="static"), ref)


def test_bf16_model_is_close_to_transformers(tmp_path):
    folder = write_hf_folder(tmp_path / "bf16", hf_cfg(), "packed", "autobitlinear", seed=4, dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    x = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x).logits.float()
        BT.accelerate(model)
        got = model(x).logits
    assert got.dtype == torch.bfloat16
    assert isinstance(model.lm_head, BT.BitlmBf16Head)  # the tied bf16 head runs on bitlm's kernel
    assert model.lm_head.weight_bf16.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still shared
    rel = float((got.float() - ref).abs().max() / ref.abs().max())
    assert rel < 0.05, rel  # transformers rounds q/a and every product to bf16, bitlm once


def test_bf16_head_computes_torch_bf16_linear():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 300, bias=False).to(torch.bfloat16)
    x = torch.randn(5, 96, generator=g).to(torch.bfloat16)
    ref = lin(x).float()
    got = BT.BitlmBf16Head(lin.weight)(x)
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 output rounding


def _snapshot(model):
    return [(n, type(m), m.weight.clone(), m.weight_scale.clone()) for n, m in bitnet_layers(model)]


@pytest.mark.parametrize("corrupt", ["scale", "code3", "meta"])
def test_refusal_names_the_layer_and_leaves_the_model_untouched(folders, corrupt):
    model = load(folders[("packed", "bitlinear")])
    last = model.model.layers[-1].mlp.down_proj  # the last layer: every earlier one would pack fine
    if corrupt == "scale":
        last.weight_scale.fill_(0.0)
    elif corrupt == "code3":
        last.weight[0, 0] = 0xFF
    else:
        last.weight = torch.empty(last.weight.shape, dtype=torch.uint8, device="meta")
    before = _snapshot(model)
    with pytest.raises(BT.BitlmIntegrationError, match=r"model\.layers\.1\.mlp\.down_proj"):
        BT.accelerate(model)
    after = _snapshot(model)
    assert [(n, t) for n, t, *_ in after] == [(n, t) for n, t, *_ in before]
    for (_, _, w0, s0), (_, _, w1, s1) in zip(before, after):
        if w0.device.type != "meta":
            assert torch.equal(w0, w1) and torch.equal(s0, s1)


def test_offline_autobitlinear_with_non_ternary_weights_is_refused(folders):
    model = load(folders[("packed", "autobitlinear")])
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = 0.5
    with pytest.raises(BT.BitlmIntegrationError, match=r"k_proj\.weight.*ternary"):
        BT.accelerate(model)
    assert len(bitnet_layers(model)) == 14


def test_a_model_without_bitnet_layers_is_refused(folders):
    model = load(folders["fp"])  # no quantization_config: transformers runs full precision
    with pytest.raises(BT.BitlmIntegrationError, match="no BitNet projections.*quantization_config=BitlmConfig"):
        BT.accelerate(model)


def test_save_of_a_swapped_model_is_refused(folders):
    model = BT.accelerate(load(folders[("packed", "bitlinear")]))
    with pytest.raises(BT.BitlmIntegrationError, match="no transformers state dict"):
        model.state_dict()


def test_registered_method_on_full_precision_weights_matches_transformers_online_mode(folders):
    """``quantization_config=BitlmConfig()`` on a checkpoint without a quantization_config: the
    projections are ternarised as transformers' online AutoBitLinear does, then packed."""
    assert transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING["bitlm"] is BT.BitlmHfQuantizer
    # the same float weights (same seed) with transformers' own online quantization_config
    ref_model = load(folders[("online", "autobitlinear")])
    assert ref_model.config.quantization_config.quantization_mode == "online"
    ref = ref_model.generate(prompt(2), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    model = load(folders["fp"], quantization_config=BT.BitlmConfig())
    assert not bitnet_layers(model) and sum(isinstance(m, BT.BitlmLinear) for m in model.modules()) == 14
    assert model.config.quantization_config.quant_method == "bitlm"
    assert torch.equal(model.generate(prompt(2), max_new_tokens=32, min_new_tokens=32, do_sample=False), ref)
    model = BT.from_pretrained(str(folders["fp"]), dtype=torch.float32)  # the helper takes this route too
    assert torch.equal(model.generate(prompt(2), max_new_tokens=32, min_new_tokens=32, do_sample=False), ref)


@pytest.mark.parametrize("variant,linear_class", VARIANTS)
def test_registered_method_on_prequantized_checkpoints(folders, variant, linear_class):
    folder = folders[(variant, linear_class)]
    ref = load(folder).generate(prompt(4), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    cfg = BT.BitlmConfig.model_config(str(folder))
    assert cfg.quantization_config["linear_class"] == linear_class
    a = load(folder, config=cfg)
    b = BT.from_pretrained(str(folder), dtype=torch.float32)
    for model in (a, b):
        assert sum(isinstance(m, BT.BitlmLinear) for m in model.modules()) == 14 and not bitnet_layers(model)
        assert torch.equal(model.generate(prompt(4), max_new_tokens=32, min_new_tokens=32, do_sample=False), ref)


def test_bitlm_config_validates_its_fields():
    with pytest.raises(ValueError, match="format"):
        BT.BitlmConfig(format="b1")
    with pytest.raises(ValueError, match="linear_class"):
        BT.BitlmConfig(linear_class="dense")
    with pytest.raises(BT.BitlmIntegrationError, match="format"):
        BT.accelerate(torch.nn.Linear(4, 4), format="hf")


def test_text_generation_pipeline_is_unchanged_by_the_swap(folders):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(256)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w2", bos_token="w1")
    model = load(folders[("packed", "autobitlinear")])
    text = " ".join(f"w{i}" for i in (5, 17, 99, 3, 42))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ref = transformers.pipeline("text-generation", model=model, tokenizer=tok)(text, **kw)[0]["generated_text"]
    BT.accelerate(model)
    got = transformers.pipeline("text-generation", model=model, tokenizer=tok)(text, **kw)[0]["generated_text"]
    assert got == ref and got.startswith(text) and len(got) >= len(text) + 2 * 12  # 12 new "wN" tokens


# ---- siblings sharing their input: q/k/v and gate/up as one packed weight -----------------------


def _solo(m):
    """The same projection without sharing (its own rows of the shared weight)."""
    return BT.BitlmLinear(m.packed, m.bias_f32, None, m.source)


class _Calls:
    """Counts the packed matmuls the integration makes (float32 models: kernels.matmul)."""

    def __init__(self, mp):
        self.n = 0
        real = BT.kernels.matmul

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)

        mp.setattr(BT.kernels, "matmul", counted)


def test_siblings_are_one_packed_weight_and_one_kernel_call_per_input(folders, monkeypatch):
    model = BT.accelerate(load(folders[("packed", "bitlinear")]), layers=False)  # the per-module path
    for blk in model.model.layers:
        att, mlp = blk.self_attn, blk.mlp
        for group in ((att.q_proj, att.k_proj, att.v_proj), (mlp.gate_proj, mlp.up_proj)):
            shared = group[0].shared
            assert shared is not None and all(m.shared is shared for m in group)
            assert [m.shared_index for m in group] == list(range(len(group)))
            assert shared.weight.N == sum(m.out_features for m in group)
            lo = 0
            for m in group:  # each module's rows: a view of the shared bytes, what packing it alone gives
                own = BT.pack_weight(m.packed.unpack(), m.packed.scale, "i2")
                assert torch.equal(own.data, m.packed.data)
                assert m.packed.data.data_ptr() == shared.weight.data[lo // 16].data_ptr()
                assert torch.equal(shared.weight.scale[lo // (shared.weight.N // shared.weight.groups)],
                                   m.packed.scale[0])
                lo += m.out_features
        assert att.o_proj.shared is None and mlp.down_proj.shared is None
    calls = _Calls(monkeypatch)
    with torch.no_grad():
        model(prompt(3, 1))
    assert calls.n == 2 * 4  # per layer: q/k/v, o, gate/up, down (was 7)


@pytest.mark.parametrize("mode", ["no_grad", "inference"])
def test_shared_result_is_reused_only_for_the_same_unmodified_input(folders, monkeypatch, mode):
    """Inference tensors have no version counter: their bytes are compared instead."""
    model = BT.accelerate(load(folders[("packed", "bitlinear")]))
    att = model.model.layers[0].self_attn
    q, k, v = att.q_proj, att.k_proj, att.v_proj
    solo = {m: _solo(m) for m in (q, k, v)}
    g = torch.Generator().manual_seed(0)
    ctx = torch.inference_mode if mode == "inference" else torch.no_grad
    calls = _Calls(monkeypatch)

    def check(m, x, shared_call):
        before = calls.n
        got = m(x)
        assert calls.n == before + (0 if shared_call else 1)
        assert torch.equal(got, solo[m](x)), m  # exact: the fused rows are the module's own product
        calls.n = before + (0 if shared_call else 1)  # not counting the solo reference
        return got

    with ctx():
        x = torch.randn(1, 3, 64, generator=g)
        check(q, x, False), check(k, x, True), check(v, x, True)  # one kernel call for all three
        check(v, x, False), check(k, x, True), check(q, x, True)  # any order
        check(q, x, False)
        x.add_(1.0)  # modified in place after q computed: k must not get the stale result
        check(k, x, False)
        check(v, x, False)  # the pending round (q's) is of the old values: v computes too
        y = torch.randn(1, 3, 64, generator=g)
        check(q, y, False)
        check(k, y.clone(), False)  # equal values, another tensor: computes alone
        check(q, y, False)  # a module called twice on one input computes again
        out_k = check(k, y, True)
        out_k.mul_(0)  # a caller modifying its slice does not touch the siblings' slices
        check(v, y, True)
        x = torch.randn(4, 2, 64, generator=g)  # prefill shapes
        check(k, x, False), check(q, x, True), check(v, x, True)
        x = torch.randn(64, 3, generator=g).t()[None]  # not contiguous: compared with torch.equal
        check(q, x, False), check(k, x, True)
        x.mul_(-1)
        check(v, x, False)


def test_siblings_with_different_scales_compute_what_transformers_computes(folders):
    model = load(folders[("packed", "bitlinear")])
    with torch.no_grad():
        for blk in model.model.layers:  # bitlinear: weight_scale divides; very different per sibling
            blk.self_attn.k_proj.weight_scale.mul_(7.0)
            blk.self_attn.v_proj.weight_scale.mul_(0.125)
            blk.mlp.up_proj.weight_scale.mul_(3.0)
    layers = dict(bitnet_layers(model))
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        ref = {n: layers[f"model.layers.0.{n}"](x) for n in ("self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj")}
    ref_gen = model.generate(prompt(6), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    BT.accelerate(model)
    att = model.model.layers[0].self_attn
    assert att.k_proj.shared is att.q_proj.shared and att.q_proj.shared.weight.scale.unique().numel() == 3
    for n, m in (("self_attn.q_proj", att.q_proj), ("self_attn.k_proj", att.k_proj), ("self_attn.v_proj", att.v_proj)):
        got = m(x)
        rel = (got - ref[n]).abs().amax(-1) / ref[n].abs().amax(-1)
        assert float(rel.max()) < 1e-5, n
    assert torch.equal(model.generate(prompt(6), max_new_tokens=32, min_new_tokens=32, do_sample=False), ref_gen)


def test_siblings_that_cannot_share_stay_separate(folders):
    model = load(folders[("packed", "autobitlinear")])
    with torch.no_grad():  # a bias on k only: q/k/v stay three weights (gate/up still share)
        att = model.model.layers[0].self_attn
        att.k_proj.bias = torch.nn.Parameter(torch.randn(att.k_proj.out_features))
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
        ref = att.k_proj(x)
    BT.accelerate(model)
    att = model.model.layers[0].self_attn
    assert att.q_proj.shared is None and att.k_proj.shared is None and model.model.layers[0].mlp.up_proj.shared
    assert model.model.layers[1].self_attn.q_proj.shared is not None
    assert float(((att.k_proj(x) - ref).abs().amax(-1) / ref.abs().amax(-1)).max()) < 1e-5


def test_norms_run_on_bitlm_and_keep_their_weights(folders):
    from transformers.models.bitnet.modeling_bitnet import BitNetRMSNorm

    model = load(folders[("packed", "bitlinear")])
    norms = {n: m for n, m in model.named_modules() if type(m) is BitNetRMSNorm}
    assert len(norms) == 2 * 4 + 1
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = {n: m(x if m.weight.numel() == 64 else torch.randn(2, 3, m.weight.numel())) for n, m in norms.items()}
    BT.accelerate(model)
    for n, old in norms.items():
        new = model.get_submodule(n)
        assert isinstance(new, BT.BitlmRMSNorm) and new.weight is old.weight
        if old.weight.numel() == 64:
            assert float((new(x) - ref[n]).abs().max() / ref[n].abs().max()) < 1e-6
    kept = BT.accelerate(load(folders[("packed", "bitlinear")]), norms=False)
    assert sum(type(m) is BitNetRMSNorm for m in kept.modules()) == 9


def test_t1_format_shares_siblings_and_generates_as_transformers(folders):
    model = load(folders[("packed", "autobitlinear")])
    ref = model.generate(prompt(8), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    BT.accelerate(model, format="t1")
    att = model.model.layers[0].self_attn
    assert att.q_proj.shared is att.v_proj.shared and att.q_proj.shared.weight.format == "t1"
    assert torch.equal(model.generate(prompt(8), max_new_tokens=32, min_new_tokens=32, do_sample=False), ref)


# ---- the fused decoder layer (BitlmDecoderLayer: two native calls per layer at decode) ----------


class _LayerCalls:
    """Counts the fused layers' native calls (native.HfLayer.qkv / out) and the model's one-call
    decode steps (native.HfStack.decode)."""

    def __init__(self, mp):
        self.qkv = self.out = self.stack = 0
        from bitlm.kernels import native

        real_qkv, real_out, real_stack = native.HfLayer.qkv, native.HfLayer.out, native.HfStack.decode

        def stack(st, *a):
            self.stack += 1
            return real_stack(st, *a)

        mp.setattr(native.HfStack, "decode", stack)

        def qkv(hf, *a):
            self.qkv += 1
            return real_qkv(hf, *a)

        def out(hf, *a):
            self.out += 1
            return real_out(hf, *a)

        mp.setattr(native.HfLayer, "qkv", qkv)
        mp.setattr(native.HfLayer, "out", out)


def _pair(folder, dtype, stack=False):
    """(per-module swapped model, fused swapped model) of one checkpoint; the fused model's
    one-call decode step (BitlmBitNetModel) only with ``stack`` — else its layers' two calls each."""
    mk = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)  # noqa: E731
    fused = BT.accelerate(mk())
    assert type(fused.model) is BT.BitlmBitNetModel
    fused.model.bitlm_fused = stack
    return BT.accelerate(mk(), layers=False), fused


def _gen(model, p, n=32, **kw):
    with torch.no_grad():
        return model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                              output_logits=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
def test_fused_layer_gives_the_per_module_paths_bits(tmp_path, tier, monkeypatch, dtype, linear_class):
    """Every decode step of generate (DynamicCache) through the fused layers: the same logits (torch.equal)
    as the per-module swapped path, on every kernel tier, float32 and bf16 models; for float32, the
    greedy tokens also equal transformers' own."""
    folder = write_hf_folder(tmp_path / "m", hf_cfg(), "packed", linear_class, seed=3, dtype=dtype)
    own = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    ref_own = _gen(own, prompt(2)).sequences
    modules, fused = _pair(folder, dtype)
    assert sum(type(m) is BT.BitlmDecoderLayer for m in fused.modules()) == 2
    assert not any(type(m) is BT.BitlmDecoderLayer for m in modules.modules())
    ref = _gen(modules, prompt(2))
    calls = _LayerCalls(monkeypatch)
    got = _gen(fused, prompt(2))
    assert calls.qkv == calls.out == 2 * 31  # every decode step, every layer (the prefill is per module)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.logits) == 32 and all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
    if dtype == torch.float32:
        assert torch.equal(got.sequences, ref_own)
    # the hidden states of one decode step, layer by layer
    caches = [transformers.DynamicCache(config=m.config) for m in (modules, fused)]
    with torch.no_grad():
        for m, c in zip((modules, fused), caches):
            m(prompt(5), cache=c, use_cache=True)
        a, b = (m(prompt(6, 1), cache=c, use_cache=True, output_hidden_states=True)
                for m, c in zip((modules, fused), caches))
    assert len(a.hidden_states) == 3 and all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))
    assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layer_with_static_cache_and_generation_config(tmp_path, monkeypatch, dtype):
    folder = write_hf_folder(tmp_path / "m", hf_cfg(), "packed", "autobitlinear", seed=6, dtype=dtype)
    modules, fused = _pair(folder, dtype)
    gc = transformers.GenerationConfig(max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                       cache_implementation="static")
    with torch.no_grad():
        ref = modules.generate(prompt(8), generation_config=gc, return_dict_in_generate=True, output_logits=True)
        calls = _LayerCalls(monkeypatch)
        got = fused.generate(prompt(8), generation_config=gc, return_dict_in_generate=True, output_logits=True)
    assert calls.qkv == 2 * 11
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(x, y) for x, y in zip(got.logits, ref.logits))


def test_fused_layer_falls_back_for_batches_prefill_and_attention_outputs(folders, monkeypatch):
    modules, fused = _pair(folders[("packed", "bitlinear")], torch.float32)
    calls = _LayerCalls(monkeypatch)
    x = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    ref, got = (_gen(m, x, 6) for m in (modules, fused))  # batch 2: every step per module
    assert calls.qkv == 0
    assert torch.equal(got.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
    with torch.no_grad():
        assert torch.equal(fused(prompt(4)).logits, modules(prompt(4)).logits)  # prefill: per module
        assert calls.qkv == 0
        fused.set_attn_implementation("eager")  # SDPA returns no weights
        one = fused(prompt(4, 1), output_attentions=True)  # the attention weights need self_attn's forward
    assert calls.qkv == 0 and len(one.attentions) == 2 and one.attentions[0].shape == (1, 4, 1, 1)
    _gen(fused, prompt(4), 3)
    assert calls.qkv == 2 * 2  # and back on the fused path


def test_fused_layer_follows_its_submodules_and_dtype(folders, monkeypatch):
    """transformers' own projections swapped back in: the layer computes transformers' own
    (per-module) result, not its stale native copy; model.to(bf16): rebuilt for the new weights."""
    folder = folders[("packed", "bitlinear")]
    own = load(folder)
    originals = dict(BT._bitnet_layers(own))
    with torch.no_grad():
        ref_own = own(prompt(4, 1)).logits
    BT.accelerate(own)
    calls = _LayerCalls(monkeypatch)
    for name, m in originals.items():
        own.set_submodule(name, m)
    with torch.no_grad():
        got = own(prompt(4, 1)).logits
    assert calls.qkv == 0
    rel = float((got - ref_own).abs().max() / ref_own.abs().max())
    assert rel < 1e-5, rel  # only the swapped norms (last-bit r) differ from transformers' own
    modules, fused = _pair(folder, torch.float32)
    modules.to(torch.bfloat16)
    fused.to(torch.bfloat16)
    ref, got = (_gen(m, prompt(9), 8) for m in (modules, fused))
    assert calls.qkv == 2 * 7
    assert torch.equal(got.sequences, ref.sequences) and all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))


def test_native_hf_layer_checks_its_inputs(folders):
    from bitlm.kernels import native

    model = BT.accelerate(load(folders[("packed", "bitlinear")]))
    hf = model.model.layers[0]._bitlm_state(torch.float32)
    assert isinstance(hf, native.HfLayer)
    x, cs = torch.randn(1, 1, hf.d_model), torch.randn(hf.head_dim)
    with pytest.raises(ValueError, match="x must be 64 contiguous"):
        hf.qkv(x.to(torch.bfloat16), cs, cs)
    with pytest.raises(ValueError, match="cos must be"):
        hf.qkv(x, torch.randn(hf.head_dim + 1), cs)
    with pytest.raises(ValueError, match="attn must be"):
        hf.out(x, torch.randn(3))
    q, k, v = hf.qkv(x, cs, cs)
    assert q.shape == (1, 4, 1, 16) and k.shape == v.shape == (1, 2, 1, 16)


def test_fused_layer_runs_cache_update_and_attention_with_torch_at_one_thread(folders, monkeypatch):
    """Between its two native calls the fused layer holds torch at one thread (its OpenMP pool
    waking for one token's cache update and attention beside bitlm's workers cost ~7 ms per 2B4T
    token) and restores the caller's thread count afterwards, even when the attention raises."""
    model = BT.accelerate(transformers.AutoModelForCausalLM.from_pretrained(str(folders["packed", "autobitlinear"])))
    model.model.bitlm_fused = False  # the layers' own decode step (the model's one call has no cache.update)
    seen = []
    real = transformers.DynamicCache.update
    monkeypatch.setattr(transformers.DynamicCache, "update",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or real(self, *a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(prompt(5), cache=cache, use_cache=True)  # prefill: per module, torch's own threads
            n = len(seen)
            model(prompt(6, 1), cache=cache, use_cache=True)  # decode: the fused layers
        assert seen[:n] == [2] * n and seen[n:] == [1] * 2 and torch.get_num_threads() == 2
        monkeypatch.setattr(transformers.DynamicCache, "update", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
        with pytest.raises(RuntimeError, match="x"), torch.no_grad():
            model(prompt(6, 1), cache=cache, use_cache=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- the model's decode step in one native call (BitlmBitNetModel) ------------------------------


def _attention_ref(q, k, v, scale):
    """One query token's attention in float64: q (H, D), k / v (Hkv, T, D)."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", q.double(), k) * scale, -1)
    return torch.einsum("ht,htd->hd", p, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_step_is_one_call_with_the_layers_keys_and_values(tmp_path, monkeypatch, dtype):
    """generate through BitlmBitNetModel: one native call per decode step; the greedy tokens of
    the layers' own fused path (and, float32, transformers' own); logits within float rounding of
    it (the attention is bitlm's, not SDPA); the DynamicCache afterwards holds the same number of
    rows, as views of buffers with spare rows."""
    folder = write_hf_folder(tmp_path / "m", hf_cfg(), "packed", "bitlinear", seed=3, dtype=dtype)
    own = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    ref_own = _gen(own, prompt(2)).sequences
    _, layers = _pair(folder, dtype)
    _, fused = _pair(folder, dtype, stack=True)
    ref = _gen(layers, prompt(2))
    calls = _LayerCalls(monkeypatch)
    cache = transformers.DynamicCache(config=fused.config)
    got = _gen(fused, prompt(2), past_key_values=cache)
    assert calls.stack == 31 and calls.qkv == 0  # every decode step in one call (the prefill per module)
    assert torch.equal(got.sequences, ref.sequences)
    if dtype == torch.float32:
        assert torch.equal(got.sequences, ref_own)
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: a few last-bit flips of attention outputs carried on
    for a, b in zip(got.logits, ref.logits):
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < tol
    assert cache.get_seq_length() == 10 + 31
    for cl in cache.layers:
        kb, vb = cl._bitlm_kv
        assert cl.keys.shape[-2] == 41 and kb.shape[2] > 41 and cl.keys.data_ptr() == kb.data_ptr()
        assert cl.values.data_ptr() == vb.data_ptr()


def test_model_decode_step_attention_and_cache_rows(folders, tier):
    """One decode step after a prefill: each layer's new key / value row is the fused layer's own
    (torch.equal: the same qkv code), the rows before it are the prefill's, and bitlm's attention
    is softmax(q·kᵀ·scale)·v over the cached rows (float64 reference, float32 rounding); every
    kernel tier gives the same bits."""
    folder = folders[("packed", "bitlinear")]
    _, layers = _pair(folder, torch.float32)
    _, fused = _pair(folder, torch.float32, stack=True)
    caches = [transformers.DynamicCache(config=m.config) for m in (layers, fused)]
    captured = []
    attn = fused.model.layers[0].self_attn
    real = BT.native.HfStack.decode

    def spy(st, x, cos, sin, keys, values, pos, scale):
        y = real(st, x, cos, sin, keys, values, pos, scale)
        captured.append([(k[:, :, : pos + 1].clone(), v[:, :, : pos + 1].clone()) for k, v in zip(keys, values)])
        return y

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(BT.native.HfStack, "decode", spy)
        for m, c in zip((layers, fused), caches):
            m(prompt(5), cache=c, use_cache=True)
        prefill = [cl.keys.clone() for cl in caches[1].layers]
        a, b = (m(prompt(6, 1), cache=c, use_cache=True).logits for m, c in zip((layers, fused), caches))
    assert len(captured) == 1
    for cl, pre in zip(caches[1].layers, prefill):
        assert torch.equal(cl.keys[:, :, :10], pre)
    # layer 0's input is the embedding on both paths: its new key and value rows are the same bits
    assert torch.equal(caches[1].layers[0].keys, caches[0].layers[0].keys)
    assert torch.equal(caches[1].layers[0].values, caches[0].layers[0].values)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5
    # the attention itself, against float64: layer 0's q from the fused layer's own qkv call
    hf0 = fused.model.layers[0]._bitlm_state(torch.float32)
    x = fused.model.embed_tokens(prompt(6, 1))
    cos, sin = fused.model.rotary_emb(x, position_ids=torch.tensor([[10]]))
    q, k, v = hf0.qkv(x.contiguous(), cos.contiguous(), sin.contiguous())
    assert torch.equal(k[0, :, 0], caches[1].layers[0].keys[0, :, 10])
    ref = _attention_ref(q[0, :, 0], caches[1].layers[0].keys[0], caches[1].layers[0].values[0], attn.scaling)
    # layer 0 alone through HfStack (its attention inside) against its out() fed the float64 attention
    st = BT.native.HfStack([hf0])
    kb = torch.zeros(1, k.shape[1], 12, k.shape[3])
    vb = torch.zeros_like(kb)
    kb[:, :, :10], vb[:, :, :10] = caches[1].layers[0].keys[:, :, :10], caches[1].layers[0].values[:, :, :10]
    y1 = st.decode(x.contiguous(), cos.contiguous(), sin.contiguous(), [kb], [vb], 10, attn.scaling)
    o = ref.float().reshape(1, 1, -1).contiguous()
    y_ref = hf0.out(x.contiguous(), o)  # the layer's output from the float64 attention, rounded to float32
    assert float((y1 - y_ref).abs().max() / y_ref.abs().max()) < 1e-5


def test_model_decode_step_falls_back_where_it_does_not_apply(folders, monkeypatch):
    """A padding mask, a StaticCache, output_hidden_states, batch 2, hooks on a decoder layer and
    bitlm_fused = False run transformers' forward over the fused layers (their own two calls);
    a cache grown by transformers' own update in between is taken over again."""
    modules, fused = _pair(folders[("packed", "bitlinear")], torch.float32, stack=True)
    calls = _LayerCalls(monkeypatch)
    with torch.no_grad():
        cache = transformers.DynamicCache(config=fused.config)
        fused(prompt(5), cache=cache, use_cache=True)
        fused(prompt(6, 1), cache=cache, use_cache=True)
        assert (calls.stack, calls.qkv) == (1, 0)
        mask = torch.ones(1, 12, dtype=torch.long)
        mask[0, 0] = 0
        fused(prompt(7, 1), cache=cache, use_cache=True, attention_mask=mask)  # padding: per layer
        assert (calls.stack, calls.qkv) == (1, 2)
        one = fused(prompt(8, 1), cache=cache, use_cache=True, output_hidden_states=True)
        assert (calls.stack, calls.qkv) == (1, 4) and len(one.hidden_states) == 3
        fused(prompt(9, 2), cache=cache, use_cache=True)  # two tokens: per module, torch.cat grows the cache
        assert cache.get_seq_length() == 15
        fused(prompt(10, 1), cache=cache, use_cache=True)  # back on the one call, from the concatenated cache
        assert calls.stack == 2 and cache.get_seq_length() == 16
        h = fused.model.layers[1].register_forward_hook(lambda *a: None)
        fused(prompt(11, 1), cache=cache, use_cache=True)
        h.remove()
        fused.model.bitlm_fused = False
        fused(prompt(12, 1), cache=cache, use_cache=True)
        fused.model.bitlm_fused = True
        assert calls.stack == 2 and calls.qkv == 4 + 2 + 2
        x = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
        ref, got = (_gen(m, x, 4) for m in (modules, fused))  # batch 2: per module
        assert calls.stack == 2 and torch.equal(got.sequences, ref.sequences)
    gc = transformers.GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                       cache_implementation="static")
    with torch.no_grad():
        s_ref = modules.generate(prompt(8), generation_config=gc)
        s_got = fused.generate(prompt(8), generation_config=gc)
    assert calls.stack == 2 and calls.qkv == 8 + 2 * 5 and torch.equal(s_got, s_ref)


def test_native_hf_stack_checks_its_inputs(folders):
    from bitlm.kernels import native

    model = BT.accelerate(load(folders[("packed", "bitlinear")]))
    hfs = [m._bitlm_state(torch.float32) for m in model.model.layers]
    st = native.HfStack(hfs)
    x, cos = torch.zeros(1, 1, 64), torch.zeros(16)
    kv = [torch.zeros(1, 2, 4, 16) for _ in range(4)]
    with pytest.raises(ValueError, match="cap > 4"):
        st.decode(x, cos, cos, kv[:2], kv[2:], 4, 0.25)  # no spare row for position 4
    with pytest.raises(ValueError, match="x / cos / sin"):
        st.decode(x.to(torch.bfloat16), cos, cos, kv[:2], kv[2:], 1, 0.25)
    with pytest.raises(ValueError, match="no layers"):
        native.HfStack([])


def test_accelerated_weights_on_huge_pages_give_the_same_bits(tmp_path, monkeypatch):
    """accelerate() moves the packed weights and the bf16 head (with the tied embedding sharing
    its storage) into one huge-page buffer; generation is bit for bit what 4 KiB pages give."""
    from bitlm import memory

    folder = write_hf_folder(tmp_path / "m", hf_cfg(), "packed", "autobitlinear", seed=3, dtype=torch.bfloat16)
    mk = lambda: transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setenv("BITLM_HUGEPAGES", "0")
    ref = _gen(BT.accelerate(mk()), prompt(2), n=12)
    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    monkeypatch.setattr(memory, "available", lambda: True)
    made = []
    real = memory.Buffer

    def spy(n):
        made.append(real(n))
        return made[-1]

    monkeypatch.setattr(memory, "Buffer", spy)
    model = BT.accelerate(mk())
    assert len(made) == 1
    lo = made[0].view(torch.uint8, 1).data_ptr()
    inside = lambda t: lo <= t.data_ptr() < lo + made[0].nbytes  # noqa: E731
    lins = [m for m in model.modules() if isinstance(m, BT.BitlmLinear)]
    assert lins and all(inside(m.packed.data) and inside(m.packed.scale) for m in lins)
    assert inside(model.lm_head.weight_bf16)
    assert model.lm_head.weight_bf16.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still shared
    got = _gen(model, prompt(2), n=12)
    assert torch.equal(got.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, ref.logits))
