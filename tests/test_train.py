"""The training loop: schedules, learning, checkpoints, bit-identical resume, bad resume."""

import json

import numpy as np
import pytest
import torch

from bitlm.config import preset
from bitlm.io.checkpoint import CheckpointError
from bitlm.train import TrainConfig, lr_at, train, weight_decay_at
from helpers import ArrayData, pattern_data
from helpers import tiny_config as cfg


def tcfg(tmp_path, **kw):
    d = dict(max_steps=30, batch_size=8, seq_len=32, eval_every=0, log_every=5, progress=False,
             out_dir=str(tmp_path / "run"), lr=3e-3)
    d.update(kw)
    return TrainConfig(**d)


def test_two_stage_schedule_b158():
    r = TrainConfig(recipe="b1.58", max_steps=100, warmup_steps=10).resolved()
    assert r["betas"] == (0.9, 0.95) and r["lr"] == 1.5e-3 and r["lr2"] == 1.0e-3
    assert lr_at(0, r) == pytest.approx(1.5e-3 / 10)
    assert lr_at(9, r) == pytest.approx(1.5e-3)
    assert lr_at(49, r) == pytest.approx(1.5e-3 * (1 - 39 / 90))  # stage 1
    assert lr_at(50, r) == pytest.approx(1.0e-3 * (1 - 40 / 90))  # stage 2: lower peak
    assert weight_decay_at(49, r) == 0.1 and weight_decay_at(50, r) == 0.0
    assert TrainConfig(recipe="b1.58", lr=3e-3).resolved()["lr2"] == pytest.approx(2e-3)  # the FAQ's 2/3 ratio


def test_b1_and_fp_recipes():
    r = TrainConfig(recipe="b1", max_steps=100, warmup_steps=10).resolved()
    assert r["betas"] == (0.9, 0.98) and r["grad_clip"] == 0.0 and r["weight_decay"] == 0.01
    assert lr_at(99, r) == pytest.approx(r["lr"] * (1 - 89 / 90))
    f = TrainConfig(recipe="fp", max_steps=100, warmup_steps=10).resolved()
    assert f["lr"] < r["lr"] and f["grad_clip"] == 1.0
    assert lr_at(99, f) == pytest.approx(f["lr"] * 0.1, rel=1e-2)  # cosine to 10 % (frac = 89/90 at the last step)
    with pytest.raises(ValueError, match="unknown recipe"):
        TrainConfig(recipe="adam").resolved()


def test_token_budget_sets_steps():
    t = TrainConfig(tokens=10_000, batch_size=4, seq_len=25)
    assert t.total_steps() == 100


@pytest.mark.parametrize("quant", ["b1.58", "b1", "fp"])
def test_training_reduces_loss(tmp_path, quant):
    torch.manual_seed(0)
    data = pattern_data()
    res = train(cfg(quant=quant), tcfg(tmp_path, recipe=quant, max_steps=40, eval_every=40, eval_batches=4,
                                       lr=3e-3 if quant != "fp" else 1e-3), data, log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    assert res.val is not None and res.val["loss"] < np.log(64)
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file()


def test_resume_is_bit_identical(tmp_path):
    data = pattern_data()
    full = train(cfg(), tcfg(tmp_path / "a", max_steps=12), data, log=lambda *a: None)
    part = train(cfg(), tcfg(tmp_path / "b", max_steps=12, max_time=0.0), data, log=lambda *a: None)
    assert part.step == 0  # max_time=0 stops before the first step, writing a checkpoint
    # now continue in two legs: stop after 5 steps by training with save_every and a step limit
    t = tcfg(tmp_path / "c", max_steps=12, save_every=5)
    import bitlm.train as T

    orig = T.lm_loss
    calls = {"n": 0}

    def crash_after_7(*a, **k):  # simulate a crash at step 7 (after the step-5 checkpoint)
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return orig(*a, **k)

    T.lm_loss = crash_after_7
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg(), t, data, log=lambda *a: None)
    finally:
        T.lm_loss = orig
    resumed = train(cfg(), t, data, resume=True, log=lambda *a: None)
    assert resumed.step == 12
    assert full.model.state_dict().keys() == resumed.model.state_dict().keys()
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), f"{k} differs after resume"


def test_resume_config_mismatch(tmp_path):
    data = pattern_data()
    train(cfg(), tcfg(tmp_path, max_steps=3), data, log=lambda *a: None)
    with pytest.raises(CheckpointError, match="d_model"):
        train(cfg(d_model=128), tcfg(tmp_path, max_steps=6), data, resume=True, log=lambda *a: None)
    with pytest.raises(CheckpointError, match="batch_size"):
        train(cfg(), tcfg(tmp_path, max_steps=6, batch_size=4), data, resume=True, log=lambda *a: None)


def test_vocab_and_seq_len_checks(tmp_path):
    with pytest.raises(ValueError, match="vocab"):
        train(cfg(), tcfg(tmp_path), ArrayData(np.arange(1000) % 100, 100), log=lambda *a: None)
    with pytest.raises(ValueError, match="max_seq_len"):
        train(cfg(), tcfg(tmp_path, seq_len=64), pattern_data(), log=lambda *a: None)


# -- per-size recipe rows (issue 10 item 13) ----------------------------------------------------

B1_ROWS = [("bitnet-125m", 2.4e-3, 0.01), ("bitnet-350m", 1.2e-3, 0.01), ("bitnet-760m", 1e-3, 0.01),
           ("bitnet-1.3b", 8e-4, 0.01), ("bitnet-2.7b", 6.4e-4, 0.01), ("bitnet-6.7b", 4.8e-4, 0.01),
           ("bitnet-13b", 4e-4, 0.05), ("bitnet-30b", 4e-4, 0.05)]  # 2310.11453 Tables 5-6
B158_ROWS = [("b1.58-700m", 1.5e-3, 1e-3), ("b1.58-1.3b", 1.2e-3, 8e-4), ("b1.58-3b", 1.2e-3, 8e-4),
             ("b1.58-3.9b", 1.2e-3, 8e-4)]  # FAQ Table 2


@pytest.mark.parametrize("name, lr, wd", B1_ROWS)
def test_b1_paper_presets_get_their_paper_row(name, lr, wd):
    r = TrainConfig(recipe="b1", max_steps=40_000).resolved(preset(name))
    assert r["lr"] == lr and r["weight_decay"] == wd and r["lr2"] is None
    assert r["warmup_steps"] == 750 and r["betas"] == (0.9, 0.98) and r["grad_clip"] == 0.0 and r["schedule"] == "poly"


@pytest.mark.parametrize("name, lr, lr2", B158_ROWS)
def test_b158_paper_presets_get_their_paper_row(name, lr, lr2):
    r = TrainConfig(recipe="b1.58", max_steps=100_000).resolved(preset(name))
    assert r["lr"] == lr and r["lr2"] == lr2
    assert r["weight_decay"] == 0.1 and r["weight_decay2"] == 0.0 and r["warmup_steps"] == 375
    assert r["betas"] == (0.9, 0.95)


def test_fp_baseline_rows():
    assert TrainConfig(recipe="fp").resolved(preset("b1.58-700m"))["lr"] == 2.5e-4
    assert TrainConfig(recipe="fp").resolved(preset("b1.58-1.3b"))["lr"] == 2.0e-4


def test_recipe_rows_between_and_below_and_above():
    # tiny CPU presets and anything below the smallest row: the smallest row
    assert TrainConfig(recipe="b1").resolved(preset("tiny-bitnet"))["lr"] == 2.4e-3
    assert TrainConfig(recipe="b1.58").resolved(preset("tiny"))["lr"] == 1.5e-3
    # between rows: the nearer by parameter ratio.  d=1280, 24 layers: 472M linear weights, between
    # 350M (302M) and 760M (679M); ratio 1.56 vs 1.44 → the 760M row
    mid = preset("bitnet-350m", d_model=1280, n_heads=16)
    assert TrainConfig(recipe="b1").resolved(mid)["lr"] == 1e-3
    lower = preset("bitnet-350m", d_model=1152, n_heads=16)  # 382M: ratio 1.27 vs 1.78 → the 350M row
    assert TrainConfig(recipe="b1").resolved(lower)["lr"] == 1.2e-3
    huge = preset("bitnet-30b", n_layers=96)  # above the largest row: the largest
    assert TrainConfig(recipe="b1").resolved(huge)["weight_decay"] == 0.05
    assert "30B" in TrainConfig(recipe="b1").resolved(huge)["row"]


def test_user_values_override_the_row():
    r = TrainConfig(recipe="b1", lr=5e-3, weight_decay=0.2, warmup_steps=7).resolved(preset("bitnet-13b"))
    assert r["lr"] == 5e-3 and r["weight_decay"] == 0.2 and r["warmup_steps"] == 7
    r = TrainConfig(recipe="b1.58", lr=2.4e-3).resolved(preset("b1.58-1.3b"))
    assert r["lr"] == 2.4e-3 and r["lr2"] == pytest.approx(1.6e-3)  # the row's 2/3 ratio


def test_short_runs_warm_up_for_the_papers_fraction():
    assert TrainConfig(recipe="b1", max_steps=4000).resolved()["warmup_steps"] == 75  # 750 / 40K of the run
    assert TrainConfig(recipe="b1", max_steps=80_000).resolved()["warmup_steps"] == 750  # never more than the paper's
    assert TrainConfig(recipe="b1.58", max_steps=100).resolved()["warmup_steps"] == 1


def test_train_help_names_the_sources(capsys):
    from bitlm.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cell in ("125M 2.4e-3", "13B 4.0e-4", "700M 1.5e-3 → 1.0e-3", "1.3B 1.2e-3 → 8.0e-4", "2310.11453",
                 "FAQ", "750", "375"):
        assert cell in text, cell


@pytest.mark.parametrize("base", ["tiny", "tiny-bitnet"])
def test_grouped_nonneg_model_trains_and_reloads(tmp_path, base):
    from bitlm.io.checkpoint import load_checkpoint

    kw = dict(weight_groups=2, weight_group_dim="parallel", act_groups=2, norm_groups=2, act_nonneg=True)
    mcfg = preset(base, vocab_size=64, max_seq_len=32, **kw)
    recipe = mcfg.quant
    res = train(mcfg, tcfg(tmp_path, recipe=recipe, max_steps=12, eval_every=12, eval_batches=2), pattern_data(),
                log=lambda *a: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert np.isfinite(res.val["loss"])
    model, _ = load_checkpoint(tmp_path / "run" / "last")
    assert model.config == mcfg
    x = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), res.model.eval()(x))
