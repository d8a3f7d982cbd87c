"""Data parallelism on torchrun (bitlm.parallel): DDP and FSDP2 on the CPU with gloo, world size 2,
against one process with grad_accum=2 on the same global batch; distributed checkpoints (DCP):
same-world resume bit-identical, 2 → 1 and 1 → 2 resharding, consolidate / bitlm.load; a killed
rank ends the run in bounded time; the user's mistakes are one line and exit 2.

Every distributed run is a real ``torch.distributed.run`` subprocess (tests/_parallel_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bitlm
from bitlm import cli
from bitlm.io.dcp import is_dcp, load_dcp_model
from helpers import dist_env

HERE = Path(__file__).parent
WORKER = HERE / "_parallel_worker.py"
SRC = HERE.parent / "src"
BASE = dict(max_steps=5, batch_size=4, seq_len=16, eval_every=5, log_every=1, progress=False, lr=3e-3,
            save_every_minutes=0)


def _env() -> dict[str, str]:
    return dist_env(SRC)


def _torchrun(nproc: int, script_args: list[str], timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *script_args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


def _run(tkw: dict, nproc: int = 1, mkw: dict | None = None) -> None:
    args = [str(WORKER), json.dumps(tkw), json.dumps(mkw or {})]
    if nproc == 1:
        p = subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=240)
    else:
        p = _torchrun(nproc, args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] if "loss" in r else r["val_loss"] for r in rows]


def _params(path: Path) -> dict[str, torch.Tensor]:
    return bitlm.load(path).state_dict()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("quant", ["b1.58", "fp"])
def test_ddp_and_fsdp_equal_one_process_with_grad_accum(tmp_path, quant):
    """5 AdamW steps: losses (train and reduced validation) and parameters agree to 1e-5 (fp32).
    The fp recipe clips gradients (1.0): FSDP's DTensor norm is the whole model's."""
    runs = {}
    for name, extra, nproc in (("one", dict(grad_accum=2, checkpoint_format="dcp"), 1),
                               ("ddp", dict(parallel="ddp"), 2), ("fsdp", dict(parallel="fsdp"), 2)):
        out = tmp_path / name
        _run({**BASE, "recipe": quant, "out_dir": str(out), **extra}, nproc, {"quant": quant})
        runs[name] = out
    ref_loss, ref = _losses(runs["one"]), _params(runs["one"] / "last")
    assert len(ref_loss) == 6 and ref_loss[-1] < ref_loss[0]
    for name in ("ddp", "fsdp"):
        assert is_dcp(runs[name] / "last")
        losses = _losses(runs[name])
        assert len(losses) == len(ref_loss)
        for a, b in zip(losses, ref_loss):
            assert abs(a - b) <= 1e-5 * abs(b), (name, losses, ref_loss)
        got = _params(runs[name] / "last")
        assert got.keys() == ref.keys()
        for k in ref:
            assert _rel(got[k], ref[k]) < 1e-5, (name, k)
    # rank 0 alone writes: the metrics have one row per step, not one per rank
    assert [json.loads(x)["step"] for x in (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 5]


def test_ddp_quant_warmup_equals_one_process(tmp_path):
    """λ warm-up under DDP: every rank sets the same λ each step (DDP broadcasts no buffers,
    ``parallel.wrap_model``), so losses and parameters equal one process with grad_accum 2."""
    warm = dict(quant_warmup="linear", quant_warmup_steps=4)
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    _run({**BASE, **warm, "recipe": "b1.58", "out_dir": str(one), "grad_accum": 2}, 1, {"quant": "b1.58"})
    _run({**BASE, **warm, "recipe": "b1.58", "out_dir": str(ddp), "parallel": "ddp"}, 2, {"quant": "b1.58"})
    for a, b in zip(_losses(ddp), _losses(one), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)
    ref, got = _params(one / "last"), _params(ddp / "last")
    for k in ref:
        assert _rel(got[k], ref[k]) < 1e-5, k
    lam = [v for k, v in got.items() if k.endswith("quant_lambda")]
    assert lam and all(float(v) == 1.0 for v in lam)  # 5 steps past a 4-step warm-up


def _stopped_at(out: Path) -> int:
    return json.loads((out / "last" / "config.json").read_text())["step"]


def test_fsdp_resume_same_world_is_bit_identical(tmp_path):
    """Rank 0 alone gets SIGINT during step 3: both ranks stop after it (the decision is agreed),
    save a distributed checkpoint, and --resume on two ranks ends bit-identical to a straight run."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _run({**BASE, "out_dir": str(straight), "parallel": "fsdp"}, 2)
    _run({**BASE, "out_dir": str(cut), "parallel": "fsdp", "stop_after": 3}, 2)
    assert _stopped_at(cut) == 3 and is_dcp(cut / "last")
    _run({**BASE, "out_dir": str(cut), "parallel": "fsdp", "resume": True}, 2)
    want, got = _params(straight / "last"), _params(cut / "last")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert _losses(cut) == _losses(straight)


@pytest.mark.slow
def test_resume_across_world_sizes_through_dcp_resharding(tmp_path):
    """2 ranks → 1 process (grad_accum 2) and 1 process → 2 ranks continue the same run."""
    straight = tmp_path / "straight"
    _run({**BASE, "out_dir": str(straight), "grad_accum": 2, "checkpoint_format": "dcp"}, 1)
    want = _params(straight / "last")
    two_one, one_two = tmp_path / "two_one", tmp_path / "one_two"
    _run({**BASE, "out_dir": str(two_one), "parallel": "fsdp", "stop_after": 2}, 2)
    _run({**BASE, "out_dir": str(two_one), "grad_accum": 2, "checkpoint_format": "dcp", "resume": True}, 1)
    _run({**BASE, "out_dir": str(one_two), "grad_accum": 2, "checkpoint_format": "dcp", "stop_after": 2}, 1)
    assert _stopped_at(one_two) == 2
    _run({**BASE, "out_dir": str(one_two), "parallel": "ddp", "resume": True}, 2)
    for out in (two_one, one_two):
        got = _params(out / "last")
        assert all(_rel(got[k], want[k]) < 1e-5 for k in want), out
        assert _losses(out) == pytest.approx(_losses(straight), rel=1e-5)


def test_resume_with_another_global_batch_is_refused(tmp_path):
    out = tmp_path / "run"
    _run({**BASE, "out_dir": str(out), "grad_accum": 2, "checkpoint_format": "dcp", "max_steps": 1}, 1)
    with pytest.raises(ValueError, match="global batch mismatch"):
        from bitlm.train import TrainConfig, train
        from helpers import pattern_data, tiny_config

        train(tiny_config(), TrainConfig(**{**BASE, "out_dir": str(out), "max_steps": 1}), pattern_data(),
              resume=True, log=lambda *a: None)


def test_consolidate_and_load_pack_a_distributed_checkpoint(tmp_path):
    out = tmp_path / "run"
    _run({**BASE, "out_dir": str(out), "parallel": "fsdp", "max_steps": 2, "eval_every": 0}, 2)
    dist_model = load_dcp_model(out / "last")[0]
    assert bitlm.load(out / "last").state_dict().keys() == dist_model.state_dict().keys()
    assert cli.main(["checkpoint", "consolidate", str(out / "last"), "--out", str(tmp_path / "plain")]) == 0
    plain = bitlm.load(tmp_path / "plain")
    sd = dist_model.state_dict()
    assert all(torch.equal(plain.state_dict()[k], sd[k]) for k in sd)
    meta = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert meta["format"] == "bitlm-checkpoint" and meta["step"] == 2 and meta["world_size"] == 2
    # bitlm pack reads the distributed checkpoint itself
    assert cli.main(["pack", "--model", str(out / "last"), "--out", str(tmp_path / "m.bitlm")]) == 0
    assert (tmp_path / "m.bitlm").stat().st_size > 0


def test_killed_rank_ends_the_run_with_an_error_in_bounded_time(tmp_path):
    """SIGKILL on rank 1 mid-run: the launch fails within the bound (torchrun stops the survivor,
    the process group's timeout bounds a survivor stuck in a collective), not a hang; --resume
    then continues from the last complete checkpoint."""
    out = tmp_path / "run"
    tkw = {**BASE, "out_dir": str(out), "parallel": "ddp", "max_steps": 400, "save_every": 2, "eval_every": 0,
           "dist_timeout": 20, "kill_rank1_at": 5}
    t0 = time.monotonic()
    p = _torchrun(2, [str(WORKER), json.dumps(tkw), "{}"], timeout=120)
    took = time.monotonic() - t0
    assert p.returncode != 0
    assert "SIGKILL" in p.stderr or "Signal 9" in p.stderr or "exitcode  : -9" in p.stderr, p.stderr[-2000:]
    assert took < 90
    # the survivor says what happened in one line (not a traceback of an "internal error")
    assert "rank 0: lost contact with another rank of the run" in p.stderr and "--resume" in p.stderr, p.stderr[-3000:]
    step = _stopped_at(out)
    assert step >= 2 and step % 2 == 0  # a complete checkpoint from before the kill
    tkw.update(max_steps=step + 2, resume=True)
    tkw.pop("kill_rank1_at")
    # another max_steps changes the schedule, not the ability to continue
    _run({**tkw}, 2)
    assert _stopped_at(out) == step + 2


# ---------------------------------------------------------------------------------------------
# The user's mistakes: one line, exit 2
# ---------------------------------------------------------------------------------------------


def _cli_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_device_backend_and_launch_are_one_line_errors(capsys, tmp_path, monkeypatch):
    base = ["train", "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]
    if not torch.cuda.is_available():
        assert "--device cuda" in _cli_error(capsys, [*base, "--device", "cuda"])
    assert "--device" in _cli_error(capsys, [*base, "--device", "tpu"])
    assert "--parallel ddp needs torchrun" in _cli_error(capsys, [*base, "--parallel", "ddp"])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert "--dist-backend nccl" in _cli_error(capsys, [*base, "--parallel", "ddp", "--dist-backend", "nccl",
                                                          "--device", "cpu"])


def test_world_size_that_does_not_divide_the_global_batch(tmp_path):
    p = _torchrun(2, ["-m", "bitlm", "train", "--preset", "tiny", "--data", str(_text(tmp_path)),
                      "--max-steps", "1", "--batch-size", "2", "--global-batch", "6", "--parallel", "ddp",
                      "--out", str(tmp_path / "o"), "--no-progress"], timeout=240)
    assert p.returncode != 0
    assert "bitlm train: error: --global-batch 6 is not a multiple of --batch-size 2 × world size 2" in p.stderr


def _text(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("".join(f"line {i} of a small corpus about ternary weights and bits.\n" for i in range(3000)))
    return f


@pytest.mark.slow
def test_nproc_execs_torchrun(tmp_path):
    """``bitlm train --nproc 2`` (``python -m bitlm``) runs two DDP ranks and saves a distributed checkpoint."""
    p = subprocess.run([sys.executable, "-m", "bitlm", "train", "--nproc", "2", "--preset", "tiny", "--data",
                        str(_text(tmp_path)), "--max-steps", "2", "--batch-size", "2", "--seq-len", "32",
                        "--out", str(tmp_path / "o"), "--no-progress", "--eval-every", "0"],
                       env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done: 2 steps") == 1  # rank 0 alone prints
    meta = json.loads((tmp_path / "o" / "last" / "config.json").read_text())
    assert meta["format"] == "bitlm-dcp" and meta["world_size"] == 2 and meta["parallel"] == "ddp"


def test_fsdp_b158_scale_is_the_whole_tensors_absmean_for_uneven_shards():
    """A BitLinear of 5 output rows on 2 FSDP2 ranks (3 + 2 rows): quantising the sharded weight
    uses Σ|w| / numel of the whole tensor (not the shard's mean, which differs), T equals the
    one-process T, and the forward (which FSDP2 runs on the gathered weight) equals one process."""
    p = _torchrun(2, [str(HERE / "_fsdp_scale_worker.py")], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert rep["sharded"] and rep["local_rows"] == [3, 16]
    assert abs(rep["local_mean"] - rep["want"]) > 0.1  # a shard's own mean would be wrong
    assert rep["global"] == pytest.approx(rep["want"], rel=1e-6)
    assert rep["scale"] == pytest.approx(rep["want"], rel=1e-6)
    assert rep["t_equal"] and rep["y_close"] and rep["dtensor_in_forward"] is False
