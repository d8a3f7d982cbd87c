"""The packed engine's f16 (default) and int8 KV caches: the rounding points (``PackedKVCache``, the
torch twin) equal the native store (``bitlm_kv_quantize`` / the fused step) bit for bit; the fused
step reads the caches directly and agrees with the per-op path; prefill, per-op decode, batched
decode and a cache-less forward all see the same rounded values."""

from __future__ import annotations

import pytest
import torch

from bitlm.engine import KVPool, PackedKVCache, convert, kv_bytes_per_token
from bitlm.kernels import native
from helpers import decode_greedy, tiny_model

KVS = ("f16", "int8")


def _native():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")


def _hard_rows() -> torch.Tensor:
    """Values that exercise every branch of the f16 rounding: ties to even, subnormals, the
    underflow and overflow edges, signed zeros, inf; plus ordinary rows."""
    f16 = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    f16 = f16[torch.isfinite(f16)]
    mids = (f16[:-1] + f16[1:]) / 2  # ties (exact in float32) between neighbours of the same sign
    edges = torch.tensor([65504.0, 65519.0, 65520.0, 1e30, -65520.0, 2.0 ** -25, 2.0 ** -25 * 1.0001, 2.0 ** -26,
                          -0.0, 0.0, float("inf"), float("-inf"), 2.0 ** -14 * 0.99999, 6.1e-5, -3e-8])
    g = torch.Generator().manual_seed(0)
    vals = torch.cat([f16, mids, mids + mids.abs() * 1e-7, edges, torch.randn(4096, generator=g) * 30])
    vals = vals[: vals.numel() // 64 * 64]
    return vals.reshape(-1, 64)


def test_f16_store_is_torch_half_bit_for_bit(tier):
    """Every finite value, ties and edges as torch rounds them; NaNs as 0x7E00 with their sign
    (torch's own .half() keeps a NaN's payload in some elements and not in others); on every tier
    (the store has an AVX-512 path and a scalar one)."""
    x = _hard_rows()
    nans = torch.tensor([0x7FC00000, 0x7FC12345, 0x7F812345, 0xFFC00001 - 2**32, 0x7FFFFFFF], dtype=torch.int32)
    x = torch.cat([x.reshape(-1), nans.view(torch.float32), torch.ones(3)]).reshape(-1, 8)  # rows of 8: tails only
    want = x.to(torch.float16).view(torch.int16)
    want = torch.where(x.isnan(), (x.view(torch.int32) >> 16 & -0x8000 | 0x7E00).to(torch.int16), want)  # canonical
    got, sc = native.kv_quantize(x, "f16")
    assert sc is None
    assert torch.equal(got.view(torch.int16), want)
    got, _ = native.kv_quantize(x.reshape(-1, 24), "f16")  # rows of 24: a 16-wide body and a tail
    assert torch.equal(got.view(torch.int16).reshape(-1, 8), want)


def test_int8_store_is_the_torch_twin_bit_for_bit(tier):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 72, generator=g) * torch.logspace(-30, 30, 300).unsqueeze(1)  # 72: 16-wide body + tail
    x[0] = 0.0  # a zero row: scale 0, codes 0
    x[1, :] = 0.5
    x[1, 3] = -127.5  # ties and the extreme code
    q, st = PackedKVCache.quantize_int8(x)
    got, s = native.kv_quantize(x, "int8")
    assert torch.equal(got, q) and torch.equal(s, st)
    assert got[0].abs().max() == 0 and s[0] == 0 and got.abs().max() == 127
    back = PackedKVCache.read_back(x, "int8")
    assert torch.equal(back, q.float() * st.unsqueeze(-1))
    assert ((back - x).abs() <= st.unsqueeze(-1) / 2 * 1.0001).all()


def _model(name="tiny-2b4t", **kw):
    return tiny_model(name, sharpen=50, sharpen_head=False, max_seq_len=96, **kw)




@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("name,fmt", [("tiny-2b4t", "i2"), ("tiny", "t1")])
def test_fused_step_reads_the_cache_type(name, fmt, kv):
    _native()
    pm = convert(_model(name), fmt)
    prompt = torch.randint(0, pm.config.vocab_size, (1, 7))
    ref_toks, ref, ref_cache = decode_greedy(pm, prompt, 30, False, kv)
    toks, out, cache = decode_greedy(pm, prompt, 30, True, kv)
    assert cache.__dict__.get("_bitlm_decoder") is not None and cache.kv == kv
    assert cache.k[0].dtype == {"f16": torch.float16, "int8": torch.int8}[kv]
    assert toks == ref_toks
    err = (out - ref).abs() / ref.abs().max()
    assert err.max() < 0.02 and (err < 1e-4).float().mean() > 0.9
    # layer 0's rows depend on the embeddings alone: the native store rounds them exactly as the twin
    assert torch.equal(cache.k[0], ref_cache.k[0]) and torch.equal(cache.v[0], ref_cache.v[0])
    if kv == "int8":
        assert torch.equal(cache.k_scale[0], ref_cache.k_scale[0]) and torch.equal(cache.v_scale[0], ref_cache.v_scale[0])


@pytest.mark.parametrize("kv", KVS)
def test_fused_kv_step_is_the_same_on_every_tier(kv):
    _native()
    pm = convert(_model(), "i2")
    prompt = torch.randint(0, 512, (1, 5))
    prev = native.tier()
    try:
        outs = {}
        for t in native.supported_tiers():
            native.set_tier(t)
            outs[t] = decode_greedy(pm, prompt, 10, True, kv)[1]
    finally:
        native.set_tier(prev)
    first = next(iter(outs.values()))
    for t, o in outs.items():
        assert torch.equal(o, first), t


@pytest.mark.parametrize("kv", ("f32", *KVS))
def test_rounding_points_agree_across_paths(kv):
    """A cache-less forward, a prefill into a cache and the batched decode see the same keys."""
    pm = convert(_model(), "i2")
    pm.kv = kv
    ids = torch.randint(0, 512, (1, 9))
    full = pm(ids)
    cache = pm.new_cache(1, 32)
    assert torch.equal(pm(ids, cache=cache), full)
    # per-op single decode vs decode_batch with torch's attention: the same bits
    pm.fused_decode = False
    c1, c2 = pm.new_cache(1, 32), pm.new_cache(1, 32)
    pm(ids[:, :5], cache=c1)
    pm(ids[:, :5], cache=c2)
    one = pm(ids[:, 5:6], cache=c1)[0, -1]
    pm.batch_attention = False
    two = pm.decode_batch([ids[0, 5].item()], [c2])[0]
    pm.batch_attention = True
    assert torch.equal(one, two)
    # a 1-token query vs row 5 of a causal 9-token one: SDPA rounds differently, nothing more
    assert torch.allclose(one, full[0, 5], rtol=1e-4, atol=1e-4 * one.abs().max().item())


def test_kv_types_change_quality_a_little():
    """f16 keys and values move the logits by f16 rounding only; int8 by a little more."""
    pm = convert(_model(), "i2")
    ids = torch.randint(0, 512, (2, 24))
    pm.kv = "f32"
    ref = pm(ids)
    for kv, tol in (("f16", 2e-3), ("int8", 3e-2)):
        pm.kv = kv
        rel = ((pm(ids) - ref).norm() / ref.norm()).item()
        assert 0 < rel < tol, (kv, rel)


def test_kv_bytes_and_bad_type():
    pm = convert(_model(), "i2")
    cfg = pm.config
    for kv, per in (("f32", 4 * cfg.head_dim), ("f16", 2 * cfg.head_dim), ("int8", cfg.head_dim + 4)):
        c = pm.new_cache(1, 10, kv=kv)
        assert c.nbytes() == 10 * kv_bytes_per_token(cfg, kv) == 10 * 2 * cfg.n_layers * cfg.kv_heads * per
        pm.kv = kv
        assert KVPool(pm, 2, 10).nbytes == 2 * c.nbytes()
    with pytest.raises(ValueError, match="--kv int4"):
        pm.kv = "int4"
    with pytest.raises(ValueError, match="--kv q8"):
        pm.new_cache(1, 10, kv="q8")


def test_decoder_rejects_a_cache_of_another_type():
    _native()
    pm = convert(_model(), "i2")
    cache = pm.new_cache(1, 16, kv="f16")
    cache.kv = "f32"  # lies about its type: the binding checks the tensors
    with pytest.raises(ValueError, match="float32"):
        pm(torch.tensor([[1]]), cache=cache)
    cache = pm.new_cache(1, 16, kv="int8")
    del cache.k_scale
    with pytest.raises(AttributeError):
        pm(torch.tensor([[1]]), cache=cache)


@pytest.mark.parametrize("head_dim", (64, 128, 48))
def test_fused_kv_attention_head_widths_same_on_every_tier(head_dim):
    """The AVX-512 attention keeps up to 64 output columns in registers per pass over the values:
    D = 64 / 128 in whole passes, D = 48 in a narrower one; all equal the generic tier bit for bit."""
    _native()
    pm = convert(_model(d_model=2 * head_dim, n_heads=2, n_kv_heads=1), "i2")
    assert pm.config.head_dim == head_dim
    prompt = torch.randint(0, 512, (1, 20))
    prev = native.tier()
    try:
        for kv in KVS:
            outs = {}
            for t in native.supported_tiers():
                native.set_tier(t)
                outs[t] = decode_greedy(pm, prompt, 6, True, kv)[1]
            first = next(iter(outs.values()))
            for t, o in outs.items():
                assert torch.equal(o, first), (kv, t)
    finally:
        native.set_tier(prev)


@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (6, 2), (5, 1)])
def test_fused_kv_attention_gqa_groups_same_on_every_tier(n_heads, n_kv):
    """The attention reads each kv head's rows once for up to 4 of its query heads (a thread's
    share may start or end inside a group), on f16 / int8 caches (kv.c) and float32 ones
    (attn_impl.h): every tier and thread count gives the generic tier's bits."""
    from bitlm import kernels

    _native()
    pm = convert(_model(d_model=64 * n_heads, n_heads=n_heads, n_kv_heads=n_kv), "i2")
    assert pm.config.head_dim == 64
    prompt = torch.randint(0, 512, (1, 13))
    prev, prev_threads = native.tier(), kernels.num_threads()
    try:
        for kv in ("f32", *KVS):
            outs = {}
            for t in native.supported_tiers():
                for threads in (1, 2, 3):
                    native.set_tier(t)
                    kernels.set_num_threads(threads)
                    outs[(t, threads)] = decode_greedy(pm, prompt, 5, True, kv)[1]
            first = next(iter(outs.values()))
            for key, o in outs.items():
                assert torch.equal(o, first), (kv, key)
    finally:
        native.set_tier(prev)
        kernels.set_num_threads(prev_threads)


@pytest.mark.parametrize("kv", ("f32", "f16", "int8"))
def test_attention_softmax_within_float_rounding_of_float64(tier, kv):
    """The attention's softmax numerators (internal.h bitlm_exp_softmax; kv.c's 16-lane twin on the
    AVX-512 tier) against float64 softmax attention over the cache's own rounded values: lengths
    around the 16-lane blocks, scores spread over ~200 (exponents below the clamp at -87 count as
    ~1e-38, i.e. nothing), on every tier — the error stays at float32 rounding (measured <= 4e-7 of the largest output)."""
    import math

    from bitlm.config import ModelConfig

    cfg = ModelConfig(arch="bitnet-2b4t", vocab_size=16, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1,
                      d_ff=64, max_seq_len=512)
    H, Hkv, D = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    g = torch.Generator().manual_seed(7)
    for T, spread in ((1, 1.0), (16, 4.0), (37, 40.0), (300, 200.0)):
        cache = PackedKVCache(cfg, 1, 320, kv=kv)
        if T > 1:
            cache.update(0, torch.randn(1, Hkv, T - 1, D, generator=g), torch.randn(1, Hkv, T - 1, D, generator=g))
            cache.advance(T - 1)
        q = torch.randn(1, H, D, generator=g) * spread
        k, v = torch.randn(1, Hkv, D, generator=g), torch.randn(1, Hkv, D, generator=g)
        cos, sin = torch.ones(1, D), torch.zeros(1, D)  # RoPE as the identity
        out = native.BatchAttention([cache], kv, H, Hkv, D, 1).run(0, q.clone(), k.clone(), v, cos, sin)
        def rows(c, scale, new, T=T):  # what the kernel reads: the cached rows dequantised in float32, then the new row
            old = c[0][0, :, : T - 1].float()
            if kv == "int8":
                old = old * scale[0][0, :, : T - 1, None]
            return torch.cat([old, PackedKVCache.read_back(new[0][:, None], kv)], 1).double()

        keys, vals = rows(cache.k, getattr(cache, "k_scale", None), k), rows(cache.v, getattr(cache, "v_scale", None), v)
        qd = q[0].double().view(Hkv, H // Hkv, D)
        p = torch.softmax(qd @ keys.transpose(1, 2) / math.sqrt(D), -1)
        want = (p @ vals).reshape(H * D)
        err = ((out[0].double() - want).abs() / want.abs().max()).max().item()
        assert err < 1e-6, (tier, kv, T, err)


@pytest.mark.parametrize("kv", ("f32", "f16"))
def test_softmax_exp_is_within_float_rounding_of_exp(tier, kv):
    """The softmax numerator itself, read back through the attention: two cached positions with
    scores 0 and x (x from -86 to 0) and values 0 and 1 give out = e / (1 + e), so e = out / (1 - out)
    recovers bitlm_exp_softmax(x) (scalar on the f32 cache's path, kv.c's 16-lane twin on the
    AVX-512 tier's f16 path) to within a few float32 roundings of exp(x) in float64."""
    from bitlm.config import ModelConfig

    H, D = 64, 16
    cfg = ModelConfig(arch="bitnet-2b4t", vocab_size=16, d_model=H * D, n_layers=1, n_heads=H, n_kv_heads=H,
                      d_ff=64, max_seq_len=8)
    scale = torch.tensor(D ** -0.5, dtype=torch.float32)
    worst = 0.0
    for lo, hi in ((-86.0, -10.0), (-10.0, -1.0), (-1.0, 0.0)):
        x = torch.linspace(lo, hi, H)
        cache = PackedKVCache(cfg, 1, 4, kv=kv)
        cache.update(0, torch.zeros(1, H, 1, D), torch.zeros(1, H, 1, D))  # position 0: score 0, value 0
        cache.advance(1)
        q = torch.zeros(1, H, D)
        q[0, :, 0] = x / scale
        k, v = torch.zeros(1, H, D), torch.ones(1, H, D)
        k[0, :, 0] = 1.0
        out = native.BatchAttention([cache], kv, H, H, D, 1).run(0, q.clone(), k, v, torch.ones(1, D),
                                                                  torch.zeros(1, D))
        s = (q[0, :, 0] * scale).double()  # the kernel's score: (q * 1 + zeros) * scale, in float32
        o = out[0].view(H, D)[:, 0].double()
        e = o / (1 - o)
        rel = ((e - s.exp()) / s.exp()).abs().max().item()
        worst = max(worst, rel)
    assert worst < 4e-7, (tier, kv, worst)  # measured 1.2e-7 (one float32 ulp) on every tier


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(8, 2, 64), (5, 1, 64), (8, 1, 64), (2, 1, 128), (2, 1, 48),
                                                   (4, 2, 40)])
def test_split_attention_is_the_same_bits(n_heads, n_kv, head_dim):
    """Long caches split the fused step's attention by kv head and position range, then by kv head
    and output columns (kv.c's bitlm_kv_keys_run / bitlm_kv_values_run): every tier, thread count
    and split point gives the one-pass attention's bits — GQA groups of 2 to 8 heads, head widths
    in whole and partial 64-column passes, and D = 40, which only the generic pieces take.  The
    split runs: its two jobs per layer show in the step's job count once the cache reaches the
    split point."""
    from bitlm import kernels

    _native()
    pm = convert(_model(d_model=head_dim * n_heads, n_heads=n_heads, n_kv_heads=n_kv), "i2")
    prompt = torch.randint(0, 512, (1, 13))
    steps = 6
    prev, prev_threads, prev_split = native.tier(), kernels.num_threads(), native.attn_split()
    try:
        for kv in KVS:
            outs, jobs = {}, {}
            for t in native.supported_tiers():
                native.set_tier(t)
                for threads in (2, 3):
                    kernels.set_num_threads(threads)
                    for split in (0, 1, 16):  # never; always; from the third decoded token on (T = 16)
                        native.set_attn_split(split)
                        native.decode_profile(True)
                        outs[(t, threads, split)] = decode_greedy(pm, prompt, steps, True, kv)[1]
                        jobs[(t, threads, split)] = native.decode_profile(False)["jobs"]
            first = outs[(native.supported_tiers()[0], 2, 0)]
            for key, o in outs.items():
                assert torch.equal(o, first), (kv, key)
            for t in native.supported_tiers():  # every split step adds parallel jobs: 6 steps > 4 > none
                for threads in (2, 3):
                    assert jobs[(t, threads, 1)] > jobs[(t, threads, 16)] > jobs[(t, threads, 0)], (kv, t, threads)
    finally:
        native.set_tier(prev)
        kernels.set_num_threads(prev_threads)
        native.set_attn_split(prev_split)


def test_attention_split_point_setting():
    _native()
    prev = native.attn_split()
    try:
        assert native.set_attn_split(300) == prev
        assert native.attn_split() == 300 and native.info()["attn_split"] == 300
        assert "attn_split=300" in native.info()["kernel_config"]
        with pytest.raises(ValueError, match="split point"):
            native.set_attn_split(-1)
        assert native.attn_split() == 300
    finally:
        native.set_attn_split(prev)


@pytest.mark.parametrize("env,want", [("100", 100), ("0", 0), ("abc", 256), ("-5", 256), ("12x", 256)])
def test_attention_split_point_from_the_environment(env, want):
    """BITLM_ATTN_SPLIT sets the first split point; anything but a count of 0 or more keeps the
    default (a typo must not turn the split off)."""
    import os
    import subprocess
    import sys

    _native()
    code = "from bitlm.kernels import native; native.load(); print(native.attn_split())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "BITLM_ATTN_SPLIT": env},
                         capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.strip()) == want
