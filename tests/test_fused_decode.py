"""The fused native decode step (``bitlm_decode_step``) against its reference twin, the per-op
engine path (``PackedModel.fused_decode = False``): same greedy tokens, logits equal up to the
attention's float rounding, the same bits on every kernel tier, and clear errors on a bad
description."""

from __future__ import annotations

import pytest
import torch

from bitlm.engine import convert
from bitlm.kernels import native
from bitlm.model import BitNetModel
from helpers import decode_greedy, tiny_model

pytestmark = pytest.mark.skipif(native.load() is None, reason="native kernels unavailable (fused decode is native only)")


def _model(name: str, **kw) -> BitNetModel:
    return tiny_model(name, sharpen=50, sharpen_head=False, max_seq_len=96, **kw)  # no greedy ties




CASES = [("tiny", "i2", {}), ("tiny", "t1", {}), ("tiny-2b4t", "i2", {}), ("tiny-2b4t", "t1", {}),
         ("tiny-2b4t", "b1", {"quant": "b1"}), ("tiny", "i2", {"sub_norm": False, "qkv_bias": True})]


@pytest.mark.parametrize("name,fmt,kw", CASES)
def test_fused_decode_equals_per_op_path(name, fmt, kw):
    m = _model(name, **kw)
    if kw.get("qkv_bias"):
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("bias"):
                    p.normal_()
    pm = convert(m, fmt)
    prompt = torch.randint(0, m.config.vocab_size, (1, 7))
    ref_toks, ref, ref_cache = decode_greedy(pm, prompt, 40, fused=False)
    toks, out, cache = decode_greedy(pm, prompt, 40, fused=True)
    assert cache.__dict__.get("_bitlm_decoder") is not None  # the fused path really ran
    assert toks == ref_toks
    # same integer math and epilogue; only the attention (vs torch SDPA) and silu (expf vs
    # Sleef) round differently, which can move an activation across an int8 boundary now and then
    err = (out - ref).abs() / ref.abs().max()
    assert (err < 1e-5).float().mean() > 0.9, err.max()
    assert err.max() < 0.02
    # the cache rows the fused step wrote are the ones the per-op path wrote
    for a, b in zip(cache.k + cache.v, ref_cache.k + ref_cache.v):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fused_decode_is_the_same_on_every_tier():
    m = _model("tiny-2b4t")
    pm = convert(m, "i2")
    prompt = torch.randint(0, 512, (1, 5))
    prev = native.tier()
    try:
        outs = {}
        for t in native.supported_tiers():
            native.set_tier(t)
            outs[t] = decode_greedy(pm, prompt, 12, fused=True)[1]
    finally:
        native.set_tier(prev)
    first = next(iter(outs.values()))
    for t, o in outs.items():
        assert torch.equal(o, first), t


def test_fused_decode_threads_agree():
    m = _model("tiny")
    pm = convert(m, "t1")
    prompt = torch.randint(0, 512, (1, 5))
    prev = native.set_num_threads(1)
    try:
        one = decode_greedy(pm, prompt, 10, fused=True)[1]
        native.set_num_threads(2)
        two = decode_greedy(pm, prompt, 10, fused=True)[1]
    finally:
        native.set_num_threads(prev)
    assert torch.equal(one, two)


def test_fused_decode_cache_overflow_is_an_error():
    pm = convert(_model("tiny"), "i2")
    pm.fused_decode = True
    cache = pm.new_cache(1, 4)
    pm(torch.tensor([[1, 2, 3, 4]]), cache=cache)
    with pytest.raises(ValueError, match="capacity 4"):
        pm(torch.tensor([[5]]), cache=cache)


def test_decoder_rejects_a_wrong_cache_shape():
    pm = convert(_model("tiny-2b4t"), "i2")
    cache = pm.new_cache(1, 8)
    cache.k[1] = torch.zeros(1, 1, 8, pm.config.head_dim)
    with pytest.raises(ValueError, match="layer 1 k_cache"):
        pm._decoder(cache)


def test_decoder_rejects_a_wrong_weight_shape():
    pm = convert(_model("tiny"), "i2")
    pm.layers[1].down = pm.layers[1].up
    with pytest.raises(ValueError, match="layer 1 down"):
        pm._decoder(pm.new_cache(1, 8))


def test_c_side_refuses_an_inconsistent_description():
    """The C checks are the last line: a description Python would never build returns EINVAL
    and writes nothing."""
    pm = convert(_model("tiny"), "i2")
    dec = pm._decoder(pm.new_cache(1, 8))
    x = torch.randn(pm.config.d_model)
    before = x.clone()
    cos = torch.ones(pm.config.head_dim)
    dec._desc.kv_heads = 3  # does not divide n_heads
    with pytest.raises(RuntimeError, match="invalid argument"):
        dec.step(x, 0, cos, cos)
    assert torch.equal(x, before)


@pytest.mark.parametrize("head,embed", [("int8", "int8"), ("int8", "f32"), ("int8", "bf16"), ("int6", "int8"),
                                        ("int4", "bf16")])
def test_fused_token_is_the_python_embedding_and_head_bit_for_bit(head, embed):
    """bitlm_decode_token (embedding row, the step, final norm and an int8-activation head in one
    native call) gives the logits of the step with the embedding and the head in Python, bit for
    bit, on every tier; a token id outside the vocabulary is a clear error."""
    pm = convert(_model("tiny-2b4t"), "i2", head=head, embed=embed)
    pm.head_act = "int8"
    prompt = torch.randint(0, pm.config.vocab_size, (1, 5))
    pm.fused_token = False
    want_toks, want, cache = decode_greedy(pm, prompt, 12, fused=True)
    assert getattr(cache._bitlm_decoder[1], "_token_tab", None) is None  # the Python head ran
    pm.fused_token = True
    prev = native.tier()
    try:
        for t in native.supported_tiers():
            native.set_tier(t)
            toks, got, cache = decode_greedy(pm, prompt, 12, fused=True)
            assert cache._bitlm_decoder[1]._token_tab is pm._rope_table[0]  # the one-call path ran
            assert toks == want_toks and torch.equal(got, want), t
    finally:
        native.set_tier(prev)
    with pytest.raises(ValueError, match=f"token id {pm.config.vocab_size} outside the vocabulary"):
        pm(torch.tensor([[pm.config.vocab_size]]), cache=cache)


def test_greedy_generation_in_one_native_call_per_token():
    """generate_tokens at temperature 0 on a packed model runs PackedModel.decode_greedy (one
    native call per token: the token, then argmax of its logits): the same tokens as the forward +
    sample_next loop, the logits left in the decoder's buffer equal the forward's, and None (no
    work done) where the one-call path does not apply."""
    from bitlm.generate import generate_tokens

    pm = convert(_model("tiny"), "i2", head="int8")  # varied greedy tokens (the tiny 2B4T shape repeats one)
    pm.head_act = "int8"
    prompt = torch.randint(0, pm.config.vocab_size, (1, 6))
    want_toks, want = decode_greedy(pm, prompt, 10, fused=True)[:2]
    calls = []
    orig = pm.decode_greedy
    pm.decode_greedy = lambda tok, cache: calls.append(tok) or orig(tok, cache)  # noqa: E731
    toks = list(generate_tokens(pm, prompt[0].tolist(), 10))
    assert toks == want_toks and len(set(toks)) > 2 and len(calls) == 9  # none after the last token
    cache = pm.new_cache(1, 16)
    pm(prompt, cache=cache, last_only=True)
    nxt = pm.decode_greedy(want_toks[0], cache)
    assert nxt == want_toks[1] and cache.pos == prompt.shape[1] + 1
    assert torch.equal(cache._bitlm_decoder[1].last_logits, want[0])
    pm.head_act = "f32"  # the head in Python: nothing runs, the caller takes the forward
    assert pm.decode_greedy(nxt, cache) is None and cache.pos == prompt.shape[1] + 1


def test_fused_token_keeps_f32_activation_heads_in_python():
    """An f32 / bf16 head read with float activations is not the native token call's: the step
    runs alone and the head in Python, as before."""
    pm = convert(_model("tiny"), "i2", head="int8")
    assert pm.head_act == "f32" and not pm._token_ok()
    cache = decode_greedy(pm, torch.randint(0, 512, (1, 4)), 2, fused=True)[2]
    assert getattr(cache._bitlm_decoder[1], "_token_tab", None) is None
    pm.head_act = "int8"
    assert pm._token_ok()


def test_decode_profile_counts_and_changes_nothing():
    """The per-phase timers (bitlm_decode_profile): on, the step gives the same bits; every
    profiled call is counted, the phases add up to at most the whole step, and at 2 threads the
    synchronisations (parallel jobs) are counted per block."""
    pm = convert(_model("tiny-2b4t"), "i2")
    prompt = torch.randint(0, 512, (1, 5))
    prev = native.set_num_threads(2)
    try:
        want = decode_greedy(pm, prompt, 6, fused=True)[1]
        native.decode_profile(True)
        got = decode_greedy(pm, prompt, 6, fused=True)[1]
        prof = native.decode_profile(False)
        after = native.decode_profile()
    finally:
        native.set_num_threads(prev)
    assert torch.equal(got, want)
    assert prof["steps"] == 6 and after == prof  # stopped: nothing more accumulates
    phases = ("norm_quant", "qkv", "rope_kv", "attn", "o", "up", "down", "vector", "other")
    assert all(prof[p] >= 0 for p in phases) and prof["qkv"] > 0 and prof["down"] > 0
    assert sum(prof[p] for p in phases) <= prof["step"] * 1.0001 + 1e-6
    assert 0 <= prof["pool_wait"] <= prof["step"]
    assert prof["jobs"] <= 6 * pm.config.n_layers * 5  # at most 5 parallel passes per block
    native.decode_profile(True)
    assert native.decode_profile(False)["steps"] == 0  # reset


@pytest.mark.parametrize("head_dim,scaling", [(64, None), (128, None),
                                              (128, {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64})])
def test_rope_table_rows_equal_per_position_factors(head_dim, scaling):
    """The fused step reads RoPE factors from a per-model table (PackedModel._rope_rows); every
    row must be the bits rope_cos_sin gives that position alone (what the per-op path uses)."""
    from bitlm.model import rope_cos_sin

    n = 600
    cos, sin = rope_cos_sin(torch.arange(n), head_dim, 500000.0, scaling)
    for p in range(n):
        c1, s1 = rope_cos_sin(torch.tensor([p]), head_dim, 500000.0, scaling)
        assert torch.equal(cos[p], c1[0]) and torch.equal(sin[p], s1[0]), p


def test_fused_decode_uses_the_rope_table_and_grows_it():
    pm = convert(_model("tiny"), "i2")
    prompt = torch.randint(0, 512, (1, 5))
    decode_greedy(pm, prompt, 3, fused=True, max_len=16)
    assert pm._rope_table[0].shape[0] == 16
    a = decode_greedy(pm, prompt, 3, fused=True, max_len=40)[1]
    assert pm._rope_table[0].shape[0] == 40
    del pm._rope_table
    b = decode_greedy(pm, prompt, 3, fused=True, max_len=40)[1]
    assert torch.equal(a, b)
