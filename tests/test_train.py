"""The training loop: schedules, learning, checkpoints, bit-identical resume, bad resume."""

import json

import numpy as np
import pytest
import torch

from bitlm.config import preset
from bitlm.io.checkpoint import CheckpointError
from bitlm.train import TrainConfig, lr_at, train, weight_decay_at


class VocabOnly:
    def __init__(self, n):
        self.vocab_size = n

    def save(self, path):
        pass


class ArrayData:
    """A minimal stand-in for bitlm.data.TokenData over a fixed token array."""

    def __init__(self, tokens, vocab_size):
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.tokenizer = VocabOnly(vocab_size)

    def batch(self, step, batch_size, seq_len, seed=0, rank=0):
        g = np.random.default_rng([seed, step, rank])
        starts = g.integers(0, self.tokens.size - seq_len - 1, batch_size)
        x = np.stack([self.tokens[s : s + seq_len] for s in starts])
        y = np.stack([self.tokens[s + 1 : s + seq_len + 1] for s in starts])
        return torch.from_numpy(x), torch.from_numpy(y)

    def val_batches(self, batch_size, seq_len, max_batches=None):
        for i in range(max_batches or 4):
            yield self.batch(i, batch_size, seq_len, seed=12345)


def pattern_data(vocab=64, n=20000):
    # a learnable sequence: a repeating pattern with some noise
    rng = np.random.default_rng(0)
    base = np.tile(np.arange(vocab), n // vocab + 1)[:n]
    noise = rng.random(n) < 0.1
    base[noise] = rng.integers(0, vocab, noise.sum())
    return ArrayData(base, vocab)


def cfg(**kw):
    return preset("tiny", vocab_size=64, max_seq_len=32, **kw)


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
