"""An interrupted training run loses nothing: SIGINT / SIGTERM finish the step, save and exit
130 / 143; an exception between steps saves the last completed step; checkpoints come by wall
time by default; ``--resume`` after ``kill -9`` continues bit-identically (real subprocesses of
``python -m bitlm.cli train`` on the tiny preset)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bitlm
import bitlm.train as T
from bitlm.config import preset
from bitlm.io.checkpoint import load_checkpoint
from bitlm.train import TrainConfig, TrainingAborted, TrainingInterrupted, train
from helpers import random_data

STEPS = 60  # the test signals at step ~3: ~57 steps (>= 0.3 s) to spare before the run would end
QUIET = dict(log=lambda *a: None)


# ---------------------------------------------------------------------------------------------
# In-process: the loop's own rules
# ---------------------------------------------------------------------------------------------


def _cfg():
    return preset("tiny", vocab_size=64, max_seq_len=32)


def _tc(out: Path, **kw) -> TrainConfig:
    d = dict(max_steps=8, batch_size=2, seq_len=16, eval_every=0, log_every=1, progress=False, out_dir=str(out),
             lr=3e-3)
    d.update(kw)
    return TrainConfig(**d)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _hook_loss(monkeypatch, at_call: int, action):
    """Run ``action()`` inside lm_loss call number ``at_call`` (1-based), i.e. mid-step."""
    orig, n = T.lm_loss, {"calls": 0}

    def hooked(*a, **k):
        n["calls"] += 1
        if n["calls"] == at_call:
            action()
        return orig(*a, **k)

    monkeypatch.setattr(T, "lm_loss", hooked)


def _saved_steps(monkeypatch) -> list[int]:
    import bitlm.io.checkpoint as C

    steps, orig = [], C.save_checkpoint

    def spy(*a, **k):
        steps.append(k["step"])
        return orig(*a, **k)

    monkeypatch.setattr(C, "save_checkpoint", spy)
    return steps


def test_sigterm_in_process_finishes_the_step_saves_and_resumes(tmp_path, monkeypatch):
    full = train(_cfg(), _tc(tmp_path / "full"), random_data(), **QUIET)
    _hook_loss(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))  # during step index 3
    old = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as ei:
        train(_cfg(), _tc(tmp_path / "b"), random_data(), **QUIET)
    e = ei.value
    assert (e.signum, e.step, e.checkpoint) == (signal.SIGTERM, 4, tmp_path / "b" / "last")  # step 3 was finished
    assert isinstance(e, KeyboardInterrupt)  # callers that only know Ctrl-C still stop
    assert signal.getsignal(signal.SIGTERM) is old  # handlers given back
    assert load_checkpoint(e.checkpoint)[1]["step"] == 4
    monkeypatch.undo()
    resumed = train(_cfg(), _tc(tmp_path / "b"), random_data(), resume=True, **QUIET)
    assert resumed.step == 8 and _same_state(full.model.state_dict(), resumed.model.state_dict())


def test_second_signal_stops_at_once_without_saving(tmp_path, monkeypatch):
    def two():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    _hook_loss(monkeypatch, 3, two)
    with pytest.raises(TrainingAborted) as ei:
        train(_cfg(), _tc(tmp_path / "b", save_every=1), random_data(), **QUIET)
    assert ei.value.signum == signal.SIGINT and isinstance(ei.value, KeyboardInterrupt)
    assert load_checkpoint(tmp_path / "b" / "last")[1]["step"] == 2  # only the periodic save before it


def test_exception_between_steps_saves_the_completed_ones(tmp_path, monkeypatch):
    full = train(_cfg(), _tc(tmp_path / "full"), random_data(), **QUIET)

    def boom():
        raise RuntimeError("out of data")

    _hook_loss(monkeypatch, 6, boom)  # in step index 5: 5 steps completed, none saved (save_every=0)
    with pytest.raises(RuntimeError, match="out of data"):
        train(_cfg(), _tc(tmp_path / "b", save_every_minutes=0), random_data(), **QUIET)
    assert load_checkpoint(tmp_path / "b" / "last")[1]["step"] == 5
    monkeypatch.undo()
    resumed = train(_cfg(), _tc(tmp_path / "b"), random_data(), resume=True, **QUIET)
    assert _same_state(full.model.state_dict(), resumed.model.state_dict())


def test_exception_inside_the_optimizer_update_saves_nothing(tmp_path, monkeypatch):
    """A half-applied update is not a state of any step: it must not overwrite the checkpoint."""
    orig = torch.optim.AdamW.step
    n = {"calls": 0}

    def step(self, *a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            with torch.no_grad():
                next(p for g in self.param_groups for p in g["params"]).add_(1.0)  # part of an update
            raise MemoryError
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(MemoryError):
        train(_cfg(), _tc(tmp_path / "b", save_every=1), random_data(), **QUIET)
    assert load_checkpoint(tmp_path / "b" / "last")[1]["step"] == 2


def test_checkpoints_by_wall_time(tmp_path, monkeypatch):
    assert TrainConfig().save_every_minutes == 10.0  # on by default
    now = {"t": 1000.0}
    monkeypatch.setattr(T, "_clock", lambda: now["t"])
    orig = T.lm_loss

    def slow(*a, **k):  # every step takes 25 s of the fake clock
        now["t"] += 25.0
        return orig(*a, **k)

    monkeypatch.setattr(T, "lm_loss", slow)
    saved = _saved_steps(monkeypatch)
    train(_cfg(), _tc(tmp_path / "a", max_steps=10, save_every_minutes=1.0), random_data(), **QUIET)
    assert saved == [3, 6, 9, 10]  # 75 s >= 60 s since the last save, and the final save
    saved.clear()
    train(_cfg(), _tc(tmp_path / "b", max_steps=10, save_every_minutes=0), random_data(), **QUIET)
    assert saved == [10]  # 0 disables
    saved.clear()
    train(_cfg(), _tc(tmp_path / "c", max_steps=10, save_every=4, save_every_minutes=1.0), random_data(), **QUIET)
    assert saved == [3, 4, 7, 8, 10]  # both rules, each from the last save of either


def test_resume_trims_metrics_of_lost_steps(tmp_path):
    train(_cfg(), _tc(tmp_path / "a", max_steps=4), random_data(), **QUIET)
    m = tmp_path / "a" / "metrics.jsonl"
    rows = m.read_text().splitlines()
    # as if killed after logging steps 5 and 6 (one line torn) while the checkpoint holds step 4
    m.write_text("\n".join(rows) + "\n" + json.dumps({"step": 5, "loss": 1.0}) + "\n" + '{"step": 6, "lo')
    train(_cfg(), _tc(tmp_path / "a", max_steps=6), random_data(), resume=True, **QUIET)
    steps = [json.loads(r)["step"] for r in m.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# Real processes: bitlm train under SIGTERM, SIGINT and SIGKILL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat and dog ran far away from big red house with small green door".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (120,), generator=g)) for _ in range(30)]
    (d / "t.txt").write_text("\n\n".join(paras) + "\n")
    return d


def _args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(corpus / "t.txt"), "--out", str(out), "--max-steps", str(STEPS),
            "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-every", "0", "--no-progress",
            "--train-set", "log_every=1", *extra]


def _env(corpus: Path) -> dict[str, str]:
    src = str(Path(bitlm.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITLM_")}
    env.update(PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               BITLM_CACHE=str(corpus / "cache"), OMP_NUM_THREADS="1")  # the threads of this process (conftest)
    return env


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run, in this process through the same CLI code."""
    from bitlm.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    old = os.environ.get("BITLM_CACHE")
    os.environ["BITLM_CACHE"] = str(corpus / "cache")
    try:
        assert main(_args(corpus, out)) == 0
    finally:
        os.environ.pop("BITLM_CACHE") if old is None else os.environ.__setitem__("BITLM_CACHE", old)
    return out


def _metric_steps(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _spawn_and(corpus: Path, out: Path, sig: int, ready, *extra: str) -> subprocess.CompletedProcess:
    """Start ``bitlm train``, wait for ``ready(out)``, send ``sig``, collect the process."""
    p = subprocess.Popen([sys.executable, "-m", "bitlm.cli", *_args(corpus, out, *extra)], env=_env(corpus),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready(out):
            if p.poll() is not None:
                pytest.fail(f"bitlm train ended (rc {p.returncode}) before the signal: {p.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "bitlm train made no progress"
            time.sleep(0.005)
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)


def _resume_in_process(corpus: Path, out: Path, monkeypatch) -> None:
    from bitlm.cli import main

    monkeypatch.setenv("BITLM_CACHE", str(corpus / "cache"))
    assert main(_args(corpus, out, "--resume")) == 0


def _assert_same_run(ref: Path, out: Path) -> None:
    """Parameters, optimizer moments and every logged loss: equal, not close."""
    a, ma = load_checkpoint(ref / "last")
    b, mb = load_checkpoint(out / "last")
    assert ma["step"] == mb["step"] == STEPS
    assert _same_state(a.state_dict(), b.state_dict()), "parameters differ from the uninterrupted run"
    oa = torch.load(ref / "last" / "optimizer.pt", weights_only=True)
    ob = torch.load(out / "last" / "optimizer.pt", weights_only=True)
    for (ka, sa), (kb, sb) in zip(oa["state"].items(), ob["state"].items()):
        assert ka == kb and _same_state(sa, sb), f"optimizer state {ka} differs"

    def losses(run):
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["lr"]) for r in rows]

    assert losses(ref) == losses(out)  # each step once, same float


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_signal_saves_and_exits_128_plus_signal(corpus, reference, tmp_path, monkeypatch, sig, code):
    out = tmp_path / "run"
    r = _spawn_and(corpus, out, sig, lambda o: _metric_steps(o) >= 3)
    assert r.returncode == code, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1, err
    meta = json.loads((out / "last" / "config.json").read_text())
    step = meta["step"]
    assert 3 <= step < STEPS
    assert err[0] == (f"bitlm train: stopped by {signal.Signals(sig).name} after step {step}; "
                      f"checkpoint saved to {out / 'last'} (continue with --resume)")
    assert _metric_steps(out) == step  # the step in progress was finished and saved: nothing lost
    if sig == signal.SIGTERM:  # (resuming after SIGKILL, below, covers the same resume path again)
        _resume_in_process(corpus, out, monkeypatch)
        _assert_same_run(reference, out)


def test_cli_resume_after_kill_9_is_bit_identical(corpus, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    ck = {}

    def checkpoint_and_more(o: Path) -> bool:  # a checkpoint exists and steps after it are under way
        try:
            ck["step"] = json.loads((o / "last" / "config.json").read_text())["step"]
        except (OSError, ValueError):
            return False
        return _metric_steps(o) > ck["step"] + 2

    r = _spawn_and(corpus, out, signal.SIGKILL, checkpoint_and_more, "--save-every", "5")
    assert r.returncode == -signal.SIGKILL
    saved = load_checkpoint(out / "last")[1]["step"]
    assert 5 <= saved < STEPS and saved % 5 == 0
    assert _metric_steps(out) > saved  # the steps since the checkpoint were lost with the process
    _resume_in_process(corpus, out, monkeypatch)
    _assert_same_run(reference, out)
