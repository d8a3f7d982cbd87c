"""LLaMA-family → BitNet b1.58 conversion (bitlm.convert), λ warm-up schedules and the
``bitlm convert`` → ``bitlm train --init-from`` path.

Every HF model here is built offline from a tiny transformers config and ``save_pretrained``;
nothing touches the hub.  Parity is checked against transformers itself: the converted model with
``quant="fp"`` or with λ = 0 must give the original logits to fp32 rounding (measured: bit-equal
on CPU — both sides run the same ops in the same order).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitlm.convert import ConvertError, calibrate_sub_norms, convert_llama, is_llama_family, lambda_schedule
from bitlm.layers import BitLinear
from bitlm.model import BitNetModel
from bitlm.train import TrainConfig, evaluate_loss, train

transformers = pytest.importorskip("transformers")

VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def quiet_single_thread():
    """Quiet transformers; one intra-op thread: these models are tiny, and on a shared 2-core
    machine two spinning OpenMP threads made a step ~30x slower (measured 0.68 s vs 0.02 s)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def hf_config(family: str = "llama", tied: bool = False, **kw):
    # non-default eps and θ so that a dropped config field shows up in the logits
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=tied)
    common.update(kw)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    return cls(**common)


def hf_model(family: str = "llama", tied: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    m = cls(hf_config(family, tied, **kw)).eval()
    with torch.no_grad():  # non-trivial norm weights and biases catch a swapped or dropped tensor
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return m


def save(m, folder: Path, **kw) -> Path:
    m.save_pretrained(str(folder), **kw)
    return folder


def ids(n: int = 40, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# parity and copying
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tied", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_logit_parity_fp_and_lambda0(tmp_path, family, tied):
    hf = hf_model(family, tied)
    folder = save(hf, tmp_path / family)
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        fp = convert_llama(folder, quant="fp")(x)
        lam0 = convert_llama(folder, quant="b1.58", quant_lambda=0.0)(x)
        q = convert_llama(folder, quant="b1.58")(x)
    # same ops, same order: fp32 rounding at most (measured: bit-equal)
    torch.testing.assert_close(fp, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lam0, ref, rtol=1e-5, atol=1e-5)
    assert (q - ref).abs().max() > 1e-3  # λ = 1 really quantises


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weights_are_copied_not_reinitialised(tmp_path, family):
    hf = hf_model(family, tied=False)
    folder = save(hf, tmp_path / family)
    conv = convert_llama(folder)
    ours = conv.state_dict()
    theirs = hf.state_dict()
    assert theirs, "empty HF state dict"
    for name, t in theirs.items():
        assert name in ours, f"{name} not converted"
        assert torch.equal(ours[name], t), f"{name} differs from the original"
    # every projection is a BitLinear (b1.58) holding the original latent weight, λ = 1
    bl = [m for m in conv.modules() if isinstance(m, BitLinear)]
    assert len(bl) == 7 * 2 and all(float(m.quant_lambda) == 1.0 for m in bl)
    assert conv.config.sub_norm is False and conv.config.qkv_bias is (family == "qwen2")
    assert not any("sub_norm" in k for k in ours)  # identity sub-norms hold no tensors


def test_sharded_bf16_and_tied_folders(tmp_path):
    hf = hf_model("qwen2", tied=True)
    folder = save(hf.to(torch.bfloat16), tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    conv = convert_llama(folder)
    assert conv.lm_head.weight is conv.model.embed_tokens.weight
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        got = conv.state_dict()[name]
        assert got.dtype == torch.float32 and torch.equal(got, t.float()), name  # bf16 → fp32 is exact


def test_mistral_sliding_window_caps_max_seq_len(tmp_path):
    hf = hf_model("mistral", sliding_window=16)
    folder = save(hf, tmp_path / "mistral")
    conv = convert_llama(folder, quant="fp")
    assert conv.config.max_seq_len == 16
    x = ids(16)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        conv(ids(17))


def test_rmsnorm_sub_norms_calibration(tmp_path):
    """With sub-norms present the float function changes; calibration brings it closer."""
    hf = hf_model("llama")
    folder = save(hf, tmp_path / "llama")
    x = ids(48, 4, seed=3)
    with torch.no_grad():
        ref = hf(x).logits
        plain = convert_llama(folder, quant="fp", sub_norms="rmsnorm")
        cal = convert_llama(folder, quant="b1.58", quant_lambda=1.0, sub_norms="rmsnorm")
        scales = calibrate_sub_norms(cal, ids(64, 4, seed=4))
        assert len(scales) == 4 and all(c > 0 for c in scales.values())
        assert all(float(m.quant_lambda) == 1.0 for m in cal.modules() if isinstance(m, BitLinear))  # λ restored
        from bitlm.layers import set_quant_lambda

        set_quant_lambda(cal, 0.0)
        err_plain = (plain(x) - ref).abs().mean().item()
        err_cal = (cal(x) - ref).abs().mean().item()
    assert plain.config.sub_norm and "model.layers.0.mlp.ffn_sub_norm.weight" in plain.state_dict()
    assert err_cal < err_plain, (err_cal, err_plain)


# ---------------------------------------------------------------------------------------------
# bad input: one-line errors naming the file and the field / tensor
# ---------------------------------------------------------------------------------------------


def test_not_a_llama_folder(tmp_path):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    folder = tmp_path / "bert"
    folder.mkdir()
    cfg.save_pretrained(str(folder))
    with pytest.raises(ConvertError, match=r"config\.json: unsupported architecture") as e:
        convert_llama(folder)
    assert "\n" not in str(e.value)
    assert not is_llama_family(folder)
    with pytest.raises(ConvertError, match="config.json: missing"):
        convert_llama(tmp_path / "nothing")


def test_missing_and_unexpected_tensors(tmp_path):
    folder = save(hf_model("llama"), tmp_path / "llama")
    st = folder / "model.safetensors"
    tensors = load_file(str(st))
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(st), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=rf"model\.safetensors: missing tensor '{name}'") as e:
        convert_llama(folder)
    assert "\n" not in str(e.value)
    save_file({**tensors, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, str(st), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.bias' is unexpected"):
        convert_llama(folder)
    save_file({**tensors, "model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 63)}, str(st),
              metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"q_proj\.weight' has shape \[64, 63\]"):
        convert_llama(folder)
    st.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConvertError, match="pickled"):
        convert_llama(folder)


@pytest.mark.parametrize("patch,match", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "'low_freq_factor'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": "64"}, "'hidden_size' has the wrong type"),
])
def test_unsupported_config_fields(tmp_path, patch, match):
    folder = save(hf_model("llama"), tmp_path / "llama")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(patch)
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConvertError, match=match) as e:
        convert_llama(folder)
    assert str(e.value).startswith(str(folder / "config.json"))


# ---------------------------------------------------------------------------------------------
# Llama 3.1 / 3.2 RoPE scaling (rope_type "llama3")
# ---------------------------------------------------------------------------------------------

# θ and head_dim 16 give wavelengths 6.3, 32, 167, 862, ...: with original_max_position_embeddings
# = 64 (low_freq_factor 1, high_freq_factor 4) the first is kept, the second interpolated, the rest
# divided by the factor, so all three branches of the formula are exercised.
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_parity_with_transformers(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from bitlm.model import rope_inv_freq

    hf = hf_model("llama", rope_parameters=dict(LLAMA3), max_position_embeddings=256)
    folder = save(hf, tmp_path / "llama31")
    m = convert_llama(folder, quant="fp")
    assert m.config.rope_scaling == {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    assert m.config.rope_theta == 500000.0 and m.config.max_seq_len == 256
    # the frequencies: exactly transformers' (same float32 operations)
    ref_inv, attn_factor = ROPE_INIT_FUNCTIONS["llama3"](hf.config, "cpu")
    ours = rope_inv_freq(m.config.head_dim, m.config.rope_theta, m.config.rope_scaling)
    assert attn_factor == 1.0 and torch.equal(ours, ref_inv)
    plain = rope_inv_freq(m.config.head_dim, m.config.rope_theta)
    assert ours[0] == plain[0] and ours[-1] == plain[-1] / 8 and plain[1] / 8 < ours[1] < plain[1]
    # the logits, over positions well past original_max_position_embeddings
    x = ids(n=150)
    with torch.no_grad():
        ref = hf(x).logits
        got = m(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the scaling matters: the same weights with plain RoPE compute something else
    unscaled = BitNetModel(m.config.replace(rope_scaling=None))
    unscaled.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert (unscaled.eval()(x) - ref).abs().max() > 1e-3
    # the transformers 4.x spelling (rope_theta + rope_scaling) converts to the same config
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"] = 500000.0
    raw["rope_scaling"] = {k: v for k, v in LLAMA3.items() if k != "rope_theta"}
    (folder / "config.json").write_text(json.dumps(raw))
    assert convert_llama(folder, quant="fp").config == m.config


def test_llama3_rope_scaling_in_the_packed_engine_and_refused_by_exports(tmp_path):
    from bitlm.engine import convert as pack_model
    from bitlm.io.gguf import save_gguf
    from bitlm.io.hf import save_hf

    folder = save(hf_model("llama", rope_parameters=dict(LLAMA3), max_position_embeddings=256), tmp_path / "l")
    m = convert_llama(folder, quant="b1.58", sub_norms="rmsnorm")
    pm = pack_model(m)
    pm.kv = "f32"  # the checkpoint's attention reads float32 keys / values
    assert pm.config.rope_scaling == m.config.rope_scaling
    x = ids(n=120)
    with torch.no_grad():
        ref = m(x)
    err = (pm(x) - ref).abs() / ref.abs().max()
    assert (err < 1e-5).float().mean() > 0.9 and err.max() < 0.02, err.max()
    # token by token (the decode path builds its own cos/sin per position)
    cache = pm.new_cache(x.shape[0], 130)
    pm(x[:, :100], cache=cache)
    for t in range(100, 120):
        step = pm(x[:, t:t + 1], cache=cache)
    err = (step[:, -1] - ref[:, 119]).abs() / ref.abs().max()
    assert err.max() < 0.02, err.max()
    # a bitlm checkpoint keeps the scaling (and older checkpoints without the field still load)
    from bitlm.config import ModelConfig

    assert ModelConfig.from_dict(m.config.to_dict()) == m.config
    assert ModelConfig.from_dict({k: v for k, v in m.config.to_dict().items() if k != "rope_scaling"}).rope_scaling is None
    with pytest.raises(ValueError, match="rope_scaling 'llama3'.*GGUF"):
        save_gguf(m, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="rope_scaling 'llama3'.*BitNetForCausalLM"):
        save_hf(m, tmp_path / "hf")


def test_load_routes_llama_family_to_convert(tmp_path):
    import bitlm.loading as bio

    folder = save(hf_model("llama"), tmp_path / "llama")
    assert is_llama_family(folder)
    m = bio.load(folder)
    assert isinstance(m, BitNetModel) and m.config.quant == "b1.58" and m.config.sub_norm is False
    assert bio.load(folder, quant="fp").config.quant == "fp"


# ---------------------------------------------------------------------------------------------
# λ warm-up schedules
# ---------------------------------------------------------------------------------------------


def test_lambda_schedules_follow_the_blog():
    W = 100
    for kind in ("linear", "exponential", "sigmoid", "none"):
        assert lambda_schedule(kind, W, W) == 1.0 and lambda_schedule(kind, 10 * W, W) == 1.0
        assert lambda_schedule(kind, 5, 0) == 1.0  # no warm-up steps: fully quantised
    assert lambda_schedule("none", 0, W) == 1.0
    assert lambda_schedule("linear", 0, W) == 0.0 and lambda_schedule("linear", 25, W) == 0.25
    assert lambda_schedule("exponential", 0, W) == 0.0
    assert lambda_schedule("exponential", 50, W) == pytest.approx(1 - 0.5**4)
    assert lambda_schedule("exponential:6", 50, W) == pytest.approx(1 - 0.5**6)
    assert lambda_schedule("exponential", 50, W, k=8) == pytest.approx(1 - 0.5**8)
    assert lambda_schedule("sigmoid", 50, W) == 0.5
    assert lambda_schedule("sigmoid:20", 75, W) == pytest.approx(1 / (1 + math.exp(-20 * 0.25)))
    assert lambda_schedule("sigmoid", 0, W) < 1e-20 and lambda_schedule("sigmoid:1e6", 1, W) == 0.0  # no overflow
    for kind in ("linear", "exponential", "sigmoid"):  # monotone ramps in [0, 1]
        vals = [lambda_schedule(kind, s, W) for s in range(W + 2)]
        assert all(0.0 <= v <= 1.0 for v in vals) and vals == sorted(vals)
    for bad in ("cosine", "linear:3", "sigmoid:x", "sigmoid:-1"):
        with pytest.raises(ValueError):
            lambda_schedule(bad, 0, W)
    with pytest.raises(ValueError, match="quant warm-up"):
        TrainConfig(quant_warmup="cosine").validate()


# ---------------------------------------------------------------------------------------------
# Training with warm-up: λ per step, bit-identical resume
# ---------------------------------------------------------------------------------------------


class _Vocab:
    def __init__(self, n):
        self.vocab_size = n

    def save(self, path):
        pass


class _Tokens:
    """A minimal TokenData over one token array (the interface bitlm.train uses)."""

    def __init__(self, train_tokens, val_tokens, tokenizer):
        self.train, self.val, self.tokenizer = train_tokens, val_tokens, tokenizer

    def batch(self, step, batch_size, seq_len, seed=0, rank=0):
        from bitlm.data import get_batch

        return get_batch(self.train, batch_size, seq_len, seed=seed, step=step, rank=rank)

    def val_batches(self, batch_size, seq_len, max_batches=None):
        from bitlm.data import iter_eval_batches

        return iter_eval_batches(self.val, batch_size, seq_len, max_batches=max_batches)


def _pattern_tokens(n=6000, seed=0):
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(VOCAB), n // VOCAB + 1)[:n]
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(0, VOCAB, noise.sum())
    return base.astype(np.int64)


def _tcfg(out, **kw):
    d = dict(max_steps=10, batch_size=4, seq_len=32, eval_every=0, log_every=1, progress=False, out_dir=str(out),
             lr=1e-3, quant_warmup="linear", quant_warmup_steps=6)
    d.update(kw)
    return TrainConfig(**d)


def test_warmup_sets_lambda_per_step_and_resume_is_bit_identical(tmp_path):
    folder = save(hf_model("llama"), tmp_path / "llama")
    data = _Tokens(_pattern_tokens(), _pattern_tokens(2000, 1), _Vocab(VOCAB))
    quiet = dict(log=lambda *a: None)
    full = train(convert_llama(folder).config, _tcfg(tmp_path / "a"), data, init_model=convert_llama(folder), **quiet)
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["quant_lambda"] for r in rows if "loss" in r] == [lambda_schedule("linear", s, 6) for s in range(10)]
    assert all(float(m.quant_lambda) == 1.0 for m in full.model.modules() if isinstance(m, BitLinear))

    import bitlm.train as T

    t = _tcfg(tmp_path / "b", save_every=4)
    orig, calls = T.lm_loss, {"n": 0}

    def crash_after_5(*a, **k):  # crash in step 5, after the step-4 checkpoint (λ = 4/6 stored)
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return orig(*a, **k)

    T.lm_loss = crash_after_5
    try:
        with pytest.raises(KeyboardInterrupt):
            train(full.model.config, t, data, init_model=convert_llama(folder), **quiet)
    finally:
        T.lm_loss = orig
    resumed = train(full.model.config, t, data, resume=True, **quiet)
    assert resumed.step == 10
    assert full.model.state_dict().keys() == resumed.model.state_dict().keys()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resume"


# ---------------------------------------------------------------------------------------------
# Acceptance: a converted tiny (pre-trained) Llama fine-tunes to a lower validation loss
# ---------------------------------------------------------------------------------------------

_WORDS = dict(
    det=["the", "a", "every", "that", "one"],
    adj=["small", "red", "quiet", "old", "bright", "lazy", "clever"],
    noun=["cat", "dog", "bird", "farmer", "river", "child", "teacher", "boat"],
    verb=["sees", "likes", "follows", "finds", "carries", "watches"],
    prep=["near", "under", "behind", "with"],
)


def _sentence(r: random.Random) -> str:
    w = {k: r.choice(v) for k, v in _WORDS.items()}
    obj = r.choice(_WORDS["noun"])
    s = f"{w['det']} {w['adj']} {w['noun']} {w['verb']} the {obj}"
    if r.random() < 0.5:
        s += f" {w['prep']} the {r.choice(_WORDS['noun'])}"
    return s + "."


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory):
    """A tiny LlamaForCausalLM pre-trained in fp (plain torch) on template text, saved with its
    byte-level BPE tokenizer: (folder, TokenData-like data, fp val loss)."""
    from bitlm.data import train_tokenizer

    root = tmp_path_factory.mktemp("pretrained")
    r = random.Random(0)
    train_text = " ".join(_sentence(r) for _ in range(500))
    val_text = " ".join(_sentence(r) for _ in range(120))
    tok = train_tokenizer([train_text], vocab_size=320, cache_dir=root / "cache")
    data = _Tokens(np.asarray(tok.encode(train_text), dtype=np.int64),
                   np.asarray(tok.encode(val_text), dtype=np.int64), tok)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=tok.eos_id,
        pad_token_id=None))
    opt = torch.optim.AdamW(hf.parameters(), lr=3e-3, weight_decay=0.0)
    hf.train()
    for step in range(150):  # fp pre-training: a few seconds on 2 cores
        x, y = data.batch(step, 16, 32, seed=1)
        loss = torch.nn.functional.cross_entropy(hf(x).logits.reshape(-1, tok.vocab_size), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    hf.eval()
    folder = root / "tiny-llama"
    hf.save_pretrained(str(folder))
    tok.save(folder)  # tokenizer.json + tokenizer_config.json, as an HF folder has them
    fp_val = evaluate_loss(convert_llama(folder, quant="fp"), data.val_batches(16, 32))["loss"]
    return folder, data, fp_val, train_text, val_text


def test_converted_llama_finetunes_to_lower_val_loss(tmp_path, pretrained_llama):
    folder, data, fp_val, _, _ = pretrained_llama
    model = convert_llama(folder)  # b1.58, λ = 1
    before = evaluate_loss(model, data.val_batches(16, 32))["loss"]
    assert fp_val < math.log(data.tokenizer.vocab_size) - 1.0  # the fp model really learned something
    tcfg = _tcfg(tmp_path / "ft", max_steps=60, batch_size=16, seq_len=32, lr=2e-3, quant_warmup="linear",
                 quant_warmup_steps=20, log_every=10, eval_every=60, eval_batches=100)
    res = train(model.config, tcfg, data, init_model=model, log=lambda *a: None)
    after = res.val["loss"]
    print(f"\nfp val loss {fp_val:.4f}; converted b1.58 (λ=1) {before:.4f}; after 60 QAT steps with linear "
          f"λ warm-up over 20: {after:.4f}")
    assert after < before - 0.1, (before, after)
    assert all(float(m.quant_lambda) == 1.0 for m in res.model.modules() if isinstance(m, BitLinear))


def test_cli_convert_then_train_init_from(tmp_path, pretrained_llama, monkeypatch, capsys):
    from bitlm.cli import main
    from bitlm.io.checkpoint import load_checkpoint

    folder, _, _, train_text, _ = pretrained_llama
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    assert main(["convert", "--model", str(folder), "--out", str(ckpt)]) == 0
    assert (ckpt / "tokenizer.json").is_file()
    model, meta = load_checkpoint(ckpt)
    assert meta["converted_from"]["architectures"] == ["LlamaForCausalLM"] and model.config.sub_norm is False
    ref = convert_llama(folder)
    assert ref.state_dict().keys() == model.state_dict().keys()
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    text = tmp_path / "text.txt"
    text.write_text(train_text * 2)
    out = tmp_path / "run"
    rc = main(["train", "--init-from", str(ckpt), "--data", str(text), "--out", str(out), "--max-steps", "3",
               "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--no-progress",
               "--train-set", "quant_warmup=linear", "--train-set", "quant_warmup_steps=100"])
    assert rc == 0
    tuned, meta = load_checkpoint(out / "last")
    assert meta["train"]["quant_warmup"] == "linear" and meta["step"] == 3
    lams = {float(m.quant_lambda) for m in tuned.modules() if isinstance(m, BitLinear)}
    assert lams == {float(torch.tensor(0.02))}  # λ of the last step (step 2 of a 100-step ramp), a float32 buffer
    # the converted model's own tokenizer was used, not a fresh BPE
    assert (out / "last" / "tokenizer.json").read_text() == (ckpt / "tokenizer.json").read_text()
    assert main(["convert", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_export_refuses_graphs_the_formats_cannot_express(tmp_path):
    from bitlm.config import preset
    from bitlm.io.gguf import save_gguf
    from bitlm.io.hf import save_hf
    from bitlm.model import BitNetModel

    m = BitNetModel(preset("tiny", sub_norm=False))
    with pytest.raises(ValueError, match="sub_norm"):
        save_hf(m, tmp_path / "hf")
    with pytest.raises(ValueError, match="sub_norm"):
        save_gguf(m, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="bias"):
        save_hf(BitNetModel(preset("tiny", qkv_bias=True)), tmp_path / "hf2")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()
