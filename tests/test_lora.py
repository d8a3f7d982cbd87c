"""LoRA on frozen ternary weights (bitlm.lora): exact start, frozen base, training, exact
save/load, the unmerged path, the (lossy) merge and its reported error, and bitlm train --lora-rank
with bit-identical resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from bitlm.config import preset
from bitlm.io.checkpoint import load_checkpoint, save_checkpoint
from bitlm.io.hf import load_hf, save_hf
from bitlm.layers import BitLinear, FrozenTernaryLinear
from bitlm.lora import (
    LoRALinear,
    add_lora,
    base_fingerprint,
    load_lora,
    lora_modules,
    lora_parameters,
    merge_error,
    merge_lora,
    save_lora,
    unload_lora,
)
from bitlm.model import BitNetModel
from bitlm.train import TrainConfig, lm_loss, train
from helpers import VOCAB, pattern_data, tiny_model
from helpers import tiny_config as cfg


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models: one intra-op thread is faster than two contending ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def base_model(seed=0, **kw) -> BitNetModel:
    return tiny_model(seed=seed, vocab_size=VOCAB, max_seq_len=32, **kw)


def ids(n=24, batch=2, seed=1):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(scale * torch.randn(m.lora_B.weight.shape, generator=g))


def codes(model) -> dict[str, torch.Tensor]:
    return {n: m.quantized_weight()[0].clone() for n, m in model.named_modules()
            if isinstance(m, BitLinear) and m.weight_quant != "fp"}


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory):
    """A tiny b1.58 model QAT-trained for 40 steps on the stride-1 pattern (checkpoint folder)."""
    out = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    train(cfg(), TrainConfig(max_steps=40, batch_size=8, seq_len=32, eval_every=0, progress=False, lr=3e-3,
                             out_dir=str(out)), pattern_data(), log=lambda *a: None)
    return out / "last"


# ---------------------------------------------------------------------------------------------
# structure and exactness
# ---------------------------------------------------------------------------------------------


def test_starts_equal_to_base_and_freezes_it():
    model = base_model()
    x = ids()
    with torch.no_grad():
        ref = model(x)
    add_lora(model, rank=4, alpha=8)
    mods = lora_modules(model)
    assert len(mods) == 7 * 2 and all(isinstance(m.base, BitLinear) for _, m in mods)
    assert mods[0][0] == "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{part}.weight" for n, _ in mods for part in ("lora_A", "lora_B")}
    assert sum(p.numel() for p in lora_parameters(model)) == sum(4 * (m.in_features + m.out_features) for _, m in mods)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(base_model(), targets=("nonexistent",))


def test_only_adapter_params_get_gradients():
    model = add_lora(base_model(), rank=4, targets=("q_proj", "down_proj"))
    model.train()
    randomise_adapters(model)  # B ≠ 0 so that A gets a gradient too
    x = ids()
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, f"{n} got a gradient"


def test_unmerged_output_is_base_plus_adapter_delta():
    model = base_model()
    x = torch.randn(2, 5, 64)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        base_y = layer(x)
    add_lora(model, rank=4, alpha=16)
    randomise_adapters(model)
    w = model.model.layers[0].self_attn.q_proj
    assert isinstance(w, LoRALinear)
    with torch.no_grad():
        want = base_y + (x @ w.lora_A.weight.T @ w.lora_B.weight.T) * (16 / 4)  # unquantised input, α/r
        torch.testing.assert_close(w(x), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(w.delta(x), x @ w.delta_weight().T, rtol=1e-5, atol=1e-6)
    # a BitLinear with a built-in norm: the adapter sees the normalised (unquantised) input
    bl = BitLinear(16, 8, norm="rmsnorm")
    wrapped = LoRALinear(bl, rank=2, alpha=2)
    nn.init.normal_(wrapped.lora_B.weight)
    xx = 3 * torch.randn(4, 16)
    with torch.no_grad():
        want = bl(xx) + wrapped.lora_B(wrapped.lora_A(bl.normalize(xx)))
        torch.testing.assert_close(wrapped(xx), want)


def test_save_load_round_trip_is_exact(tmp_path):
    model = add_lora(base_model(), rank=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"))
    randomise_adapters(model)
    with torch.no_grad():
        nn.init.normal_(model.model.layers[1].self_attn.v_proj.lora_A.weight)
    st = save_lora(model, tmp_path / "ad")
    assert st == tmp_path / "ad" / "adapter.safetensors"
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 8 and meta["targets"] == ["q_proj", "v_proj", "up_proj"]
    assert meta["base_fingerprint"] == base_fingerprint(model) and len(meta["modules"]) == 6

    fresh = load_lora(base_model(), tmp_path / "ad")  # adds the adapters from the saved config
    assert [n for n, _ in lora_modules(fresh)] == [n for n, _ in lora_modules(model)]
    for (n, a), (_, b) in zip(lora_modules(model), lora_modules(fresh)):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight) and torch.equal(a.lora_B.weight, b.lora_B.weight), n
    x = ids()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # a single-file path works too, and a different base is refused (fingerprint)
    save_lora(model, tmp_path / "one.safetensors")
    assert (tmp_path / "one.json").is_file()
    other = base_model(seed=1)
    with pytest.raises(ValueError, match="different base model"):
        load_lora(other, tmp_path / "one.safetensors")
    assert not lora_modules(other)  # a failed load leaves the model as it came
    load_lora(other, tmp_path / "one.safetensors", check_base=False)
    with pytest.raises(FileNotFoundError):
        load_lora(base_model(), tmp_path / "missing")


def test_unload_gives_back_the_base():
    model = base_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model)
    randomise_adapters(model)
    unload_lora(model)
    assert not lora_modules(model) and not hasattr(model, "lora_config")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---------------------------------------------------------------------------------------------
# merging: exact for float bases, lossy (and reported) for ternary ones
# ---------------------------------------------------------------------------------------------


def test_merge_float_base_is_exact():
    model = add_lora(base_model(quant="fp"), rank=4)
    randomise_adapters(model)
    x = ids()
    with torch.no_grad():
        unmerged = model(x)
        errors = {}
        merge_lora(model, errors=errors)
        merged = model(x)
    assert not lora_modules(model)
    assert max(e["lost"] for e in errors.values()) < 1e-5
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_merge_ternary_base_is_lossy_and_reported(tmp_path):
    model = add_lora(base_model(), rank=4)
    randomise_adapters(model, scale=0.05)
    x = ids(32, 4)
    with torch.no_grad():
        base_logits = unload_lora(base_model())(x)
        unmerged = model(x)
        report = merge_error(model)
        errors = {}
        merge_lora(model, errors=errors)
        merged = model(x)
    assert errors == report and len(errors) == 14
    lost = np.mean([e["lost"] for e in errors.values()])
    flipped = np.mean([e["flipped"] for e in errors.values()])
    # the merged ternary model keeps only part of the adapter's effect
    d_adapter = (unmerged - base_logits).abs().mean().item()
    d_merge = (merged - unmerged).abs().mean().item()
    print(f"\nternary merge: mean share of ‖ΔW‖ lost {lost:.3f}, codes flipped {flipped:.4f}, "
          f"logit |unmerged - base| {d_adapter:.4f}, |merged - unmerged| {d_merge:.4f}")
    assert 0.05 < lost < 2.0 and d_merge > 1e-4
    assert all(isinstance(m, BitLinear) for n, m in model.named_modules() if n.endswith("q_proj"))


def test_lora_on_frozen_ternary_layers(tmp_path):
    """Packed HF checkpoints load as FrozenTernaryLinear: adapters wrap them; a merge keeps the
    pinned scale and stays a FrozenTernaryLinear."""
    src = base_model()
    save_hf(src, tmp_path / "hf", packed=True)
    model = load_hf(tmp_path / "hf")
    assert isinstance(model.model.layers[0].self_attn.q_proj, FrozenTernaryLinear)
    x = ids()
    with torch.no_grad():
        ref = model(x)
    fp = base_fingerprint(model, ["model.layers.0.self_attn.q_proj"])
    add_lora(model, rank=2, targets=("q_proj", "o_proj"))
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # the same base, thawed into latents, has the same ternary codes and fingerprint
    assert base_fingerprint(src, ["model.layers.0.self_attn.q_proj"]) == fp
    randomise_adapters(model, scale=0.5)
    with pytest.raises(ValueError, match="no latent weights"):
        merge_lora(model, mode="latent")
    errors = {}
    merge_lora(model, errors=errors)
    for n in errors:
        assert isinstance(model.get_submodule(n), FrozenTernaryLinear)
    assert any(e["flipped"] > 0 for e in errors.values())


def test_refit_is_no_worse_than_keeping_the_scale():
    from bitlm import quant as Q
    from bitlm.lora import refit_ternary

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 40, generator=g) * 0.02
    t, s = Q.ternary_quantize(w)
    for scale in (0.001, 0.01, 0.05):
        target = Q.dequantize_weight(t, s) + scale * torch.randn(48, 40, generator=g)
        pinned = (Q.dequantize_weight(Q.round_half_even(target / s).clamp(-1, 1), s) - target).norm()
        t2, s2 = refit_ternary(target, s)
        refit = (Q.dequantize_weight(t2, s2) - target).norm()
        assert refit <= pinned + 1e-6 and set(t2.unique().tolist()) <= {-1, 0, 1}


# ---------------------------------------------------------------------------------------------
# training: loss goes down, codes do not change, bitlm train --lora-rank with resume
# ---------------------------------------------------------------------------------------------


def tcfg(tmp_path, **kw):
    d = dict(max_steps=30, batch_size=8, seq_len=32, eval_every=0, log_every=1, progress=False,
             out_dir=str(tmp_path / "run"), lr=1e-2, lora_rank=8, lora_alpha=16.0)
    d.update(kw)
    return TrainConfig(**d)


def test_lora_training_reduces_loss_and_keeps_the_ternary_codes(tmp_path, trained_base):
    base, _ = load_checkpoint(trained_base)
    latent = {k: v.clone() for k, v in base.state_dict().items()}
    before = codes(base)
    # a new task for the trained base: the stride-3 pattern
    res = train(base.config, tcfg(tmp_path), pattern_data(stride=3), init_model=base, log=lambda *a: None)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"\nLoRA r=8 on a frozen b1.58 base, new task: loss {losses[0]:.3f} → {np.mean(losses[-5:]):.3f} "
          "(mean of the last 5 of 30 steps)")
    assert np.mean(losses[-5:]) < losses[0] - 0.5, losses
    model = res.model
    assert lora_modules(model)
    unload_lora(model)
    after = codes(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    sd = model.state_dict()
    assert all(torch.equal(latent[k], sd[k]) for k in latent)  # nothing of the base moved at all

    last = tmp_path / "run" / "last"
    assert (last / "adapter.safetensors").is_file() and (last / "adapter_config.json").is_file()
    loaded, meta = load_checkpoint(last)  # the checkpoint's model is the plain base
    assert meta["lora"]["rank"] == 8 and not lora_modules(loaded)
    assert all(torch.equal(latent[k], v) for k, v in loaded.state_dict().items())
    load_lora(loaded, last)
    load_lora(model, last)  # re-attach to the trained model (unloaded above for the code check)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    # what merging these trained adapters into the ternary weights costs (the report's numbers)
    from bitlm.train import evaluate_loss

    val = list(pattern_data(stride=3).val_batches(8, 32))
    import copy

    unmerged = evaluate_loss(model, val)["loss"]
    base_loss = evaluate_loss(load_checkpoint(trained_base)[0], val)["loss"]
    merged, lost = {}, {}
    for mode in ("latent", "refit"):
        errors = {}
        merged[mode] = evaluate_loss(merge_lora(copy.deepcopy(model), mode=mode, errors=errors), val)["loss"]
        lost[mode] = np.mean([e["lost"] for e in errors.values()])
        flipped = np.mean([e["flipped"] for e in errors.values()])
        print(f"merge {mode}: val loss {merged[mode]:.3f}, loses {lost[mode]:.0%} of ‖ΔW‖ (mean over layers), "
              f"flips {flipped:.2%} of the codes")
    print(f"val loss on the new task: base {base_loss:.3f}, base + adapters (unmerged, exact) {unmerged:.3f}")
    assert unmerged < base_loss - 0.5
    assert unmerged < merged["refit"] < base_loss and 0.0 < lost["refit"] < lost["latent"]


def test_cli_lora_train_and_bit_identical_resume(tmp_path, monkeypatch):
    import bitlm.train as T
    from bitlm.cli import main

    base = base_model()
    ckpt = save_checkpoint(base, tmp_path / "base")
    data = pattern_data()
    full = train(base.config, tcfg(tmp_path / "a", max_steps=10), data, init_model=base_model(), log=lambda *a: None)

    t = tcfg(tmp_path / "b", max_steps=10, save_every=4)
    orig, calls = T.lm_loss, {"n": 0}

    def crash_after_6(*a, **k):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return orig(*a, **k)

    T.lm_loss = crash_after_6
    try:
        with pytest.raises(KeyboardInterrupt):
            train(base.config, t, data, init_model=base_model(), log=lambda *a: None)
    finally:
        T.lm_loss = orig
    # the exception left the loop between steps: the 6 completed steps were saved on the way out
    assert json.loads((tmp_path / "b" / "run" / "last" / "config.json").read_text())["step"] == 6
    resumed = train(base.config, t, data, resume=True, log=lambda *a: None)
    assert resumed.step == 10
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"

    # the CLI flags reach the same code path
    monkeypatch.setenv("BITLM_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("abcdefgh " * 400)
    tok_dir = tmp_path / "tok"
    from bitlm.data import train_tokenizer

    train_tokenizer(["abcdefgh " * 400], vocab_size=260, cache_dir=tmp_path / "cache").save(tok_dir)
    out = tmp_path / "cli"
    ckpt = save_checkpoint(BitNetModel(preset("tiny", vocab_size=260, max_seq_len=32)), tmp_path / "base260")
    rc = main(["train", "--init-from", str(ckpt), "--tokenizer", str(tok_dir), "--data", str(text), "--out", str(out),
               "--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--no-progress",
               "--lora-rank", "2", "--lora-alpha", "4", "--train-set", "lora_targets=q_proj,v_proj"])
    assert rc == 0
    meta = json.loads((out / "last" / "adapter_config.json").read_text())
    assert meta["rank"] == 2 and meta["alpha"] == 4 and meta["targets"] == ["q_proj", "v_proj"]


def test_bitlm_load_applies_the_adapters_of_a_lora_run(tmp_path):
    import bitlm
    from bitlm.lora import save_lora_checkpoint

    model = base_model()
    add_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    model.eval()
    save_lora_checkpoint(model, tmp_path / "run")
    loaded = bitlm.load(tmp_path / "run").eval()
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pack_and_export_of_a_lora_run_refuse_or_merge(tmp_path, capsys):
    """A LoRA run (base + adapter.safetensors) in ``bitlm pack`` / ``bitlm export``: W + ΔW is not
    ternary, so without ``--merge-lora`` each verb refuses in one line naming the adapter and the way
    out (before: pack blamed an 'fp model', export --format hf ended in an internal AttributeError);
    with ``--merge-lora`` the adapters are folded in (refit, as ``merge_lora``), the loss is
    reported, and the packed / exported model is the merged one."""
    import bitlm
    from bitlm.cli import main
    from bitlm.engine import convert
    from bitlm.lora import merge_lora, save_lora_checkpoint

    model = base_model()
    add_lora(model, rank=4, alpha=8)
    randomise_adapters(model, scale=0.5)
    model.eval()
    run = save_lora_checkpoint(model, tmp_path / "run")
    for argv, target in ((["pack", "--model", str(run), "--out", str(tmp_path / "m.bitlm")], "a packed .bitlm"),
                         (["export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf")], "HF"),
                         (["export", "--model", str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                          "GGUF")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "LoRA adapter" in err and "--merge-lora" in err, err
        assert target in err and "model.layers.0.self_attn.q_proj" in err, err
    with pytest.raises(ValueError, match="LoRA adapter"):
        bitlm.pack(model)
    with pytest.raises(ValueError, match="LoRA adapter"):
        bitlm.save(model, tmp_path / "api-hf", format="hf")
    # --merge-lora: the merged model, packed and exported
    merged = merge_lora(bitlm.load(run))
    assert main(["pack", "--model", str(run), "--out", str(tmp_path / "m.bitlm"), "--merge-lora"]) == 0
    out = capsys.readouterr().out
    assert "merged 14 LoRA adapters" in out and "of the adapters' update lost" in out, out
    x = ids()
    with torch.no_grad():
        assert torch.equal(bitlm.load(tmp_path / "m.bitlm")(x), convert(merged)(x))
    assert main(["export", "--model", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--merge-lora"]) == 0
    capsys.readouterr()
    with torch.no_grad():
        assert torch.allclose(bitlm.load(tmp_path / "hf")(x), merged(x), rtol=1e-5, atol=1e-5)
    # on a run without adapters the option is an error, not a silent no-op
    plain = save_checkpoint(base_model(), tmp_path / "plain")
    assert main(["pack", "--model", str(plain), "--out", str(tmp_path / "p.bitlm"), "--merge-lora"]) == 2
    assert "--merge-lora" in capsys.readouterr().err
