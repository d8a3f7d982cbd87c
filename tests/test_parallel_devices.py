"""Devices, precision and torch.compile (bitlm.parallel) on the CPU: the device/precision rules,
bf16 autocast on the device's own type, compiled blocks equal to eager, batches moved to the
model's device in training, evaluation and generation, and a missing device as a one-line error."""

from __future__ import annotations

import pytest
import torch

from bitlm import cli
from bitlm import parallel as P
from bitlm.train import TrainConfig, evaluate_loss, lm_loss, train
from helpers import pattern_data, tiny_config, tiny_model


def test_device_rules():
    assert P.resolve_device("cpu") == torch.device("cpu")
    assert P.resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ValueError, match="--device 'tpu'"):
        P.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^--device cuda: CUDA is not available"):
            P.resolve_device("cuda")


def test_precision_defaults_to_bf16_on_cuda_only():
    assert P.resolve_precision(None, torch.device("cuda", 0)) == "bf16"
    assert P.resolve_precision(None, torch.device("cpu")) == "fp32"
    assert P.resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    with pytest.raises(ValueError, match="--precision"):
        P.resolve_precision("fp16", torch.device("cpu"))


def test_bf16_autocast_is_on_the_device_type():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    with P.autocast(torch.device("cpu"), "bf16"):
        assert lin(x).dtype == torch.bfloat16
    with P.autocast(torch.device("cpu"), "fp32"):
        assert lin(x).dtype == torch.float32


def test_batches_go_to_the_device():
    t = torch.arange(6).view(2, 3)
    out = P.to_device(t, torch.device("cpu"))
    assert out.device.type == "cpu" and torch.equal(out, t)


def test_bf16_training_runs_on_the_cpu_with_autocast(tmp_path):
    """precision=bf16 trains (autocast on "cpu") and its losses differ from fp32's: bf16 really ran."""
    losses = {}
    for prec in ("fp32", "bf16"):
        tc = TrainConfig(max_steps=3, batch_size=4, seq_len=16, eval_every=3, progress=False, lr=3e-3,
                         out_dir=str(tmp_path / prec), precision=prec, device="cpu", save_every_minutes=0)
        res = train(tiny_config(), tc, pattern_data(), log=lambda *a: None)
        losses[prec] = res.val["loss"]
    assert abs(losses["fp32"] - losses["bf16"]) > 0
    assert abs(losses["fp32"] - losses["bf16"]) < 0.1


@pytest.mark.slow  # inductor compiles C++ on the CPU: 20-50 s per model
@pytest.mark.parametrize("quant", ["b1.58", "fp"])
def test_compiled_blocks_equal_eager(quant):
    """torch.compile per block (in place: the state-dict keys stay) gives the eager logits and
    gradients (allclose) on the CPU."""
    eager = tiny_model(quant=quant, vocab_size=64, max_seq_len=32).train()
    comp = tiny_model(quant=quant, vocab_size=64, max_seq_len=32).train()
    P.compile_blocks(comp)
    assert comp.state_dict().keys() == eager.state_dict().keys()
    x, y = pattern_data().batch(0, 2, 16)
    le, lc = lm_loss(eager, x, y), lm_loss(comp, x, y)
    assert torch.allclose(le, lc, rtol=1e-4, atol=1e-5)
    le.backward()
    lc.backward()
    for (n, a), (_, b) in zip(eager.named_parameters(), comp.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-3, atol=1e-5), n


def test_evaluate_loss_moves_batches_to_the_model_device():
    m = tiny_model(vocab_size=64, max_seq_len=32)
    data = pattern_data()
    a = evaluate_loss(m, data.val_batches(4, 16, 2))
    b = evaluate_loss(m, data.val_batches(4, 16, 2), device="cpu")
    assert a == b


def test_missing_device_is_a_one_line_error_for_train_eval_generate_experiment(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    m = tmp_path / "m"
    from bitlm.io.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(vocab_size=64, max_seq_len=32), m)
    for argv in (["train", "--preset", "tiny", "--device", "cuda", "--max-steps", "1", "--out", str(tmp_path / "o")],
                 ["eval", "--model", str(m), "--text", "hello", "--device", "cuda"],
                 ["generate", "--model", str(m), "--prompt", "hi", "--device", "cuda"],
                 ["experiment", "compare", "--quick", "--device", "cuda", "--out", str(tmp_path / "ex")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--device cuda: CUDA is not available" in err, err


def test_experiment_device_reaches_every_training_run(monkeypatch, tmp_path):
    """``bitlm experiment --device cpu`` trains (and sizes ``--minutes``) on that device: the
    option reaches the TrainConfig of every run and the step timing (issue 11: --device for the
    experiments too)."""
    import bitlm.experiments as X
    import bitlm.train as T

    seen: list[str] = []

    def fake_train(mcfg, tcfg, data, **kw):
        seen.append(tcfg.device)
        raise FloatingPointError("stop here")  # _train records a diverged run and goes on

    monkeypatch.setattr(T, "train", fake_train)
    s = X.Setup.build("lr", quick=True, device="cpu", lrs=(1e-3,))
    ctx = X.Context("lr", s, tmp_path, pattern_data(), False, t0=0.0)
    X._train(ctx, "a", s.model_config("fp"), "fp", 1e-3)
    assert seen == ["cpu"]
    timed: list[str | None] = []
    monkeypatch.setattr(T, "time_train_step", lambda *a, device=None, **k: timed.append(device) or 0.01)
    X._fit_steps("compare", s, pattern_data(), 1.0)
    assert timed and set(timed) == {"cpu"}
    # the real step timing runs where it is told
    assert T.time_train_step(tiny_config(vocab_size=64, max_seq_len=32), pattern_data(), 2, 16, steps=1,
                             device="cpu") > 0


_FAULTS = """
import os, resource, sys
import torch
from bitlm import parallel as P
applied = P.keep_freed_host_memory()
for _ in range(12):  # torch allocates 64-byte aligned: glibc walks up the fresh heap a few times, then reuses
    torch.empty(64 << 18).fill_(1.0)  # 64 MiB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.empty(64 << 18).fill_(2.0)  # the same size again
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child_words(code: str, drop: tuple[str, ...], extra: dict) -> list[str]:
    """What a fresh ``python -c code`` prints, split into words, with the environment's variables
    starting with ``drop`` removed and ``extra`` added."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                          check=True, timeout=120).stdout.split()


def _faults(env_extra: dict) -> tuple[str, int]:
    out = _child_words(_FAULTS, ("MALLOC_", "BITLM_MALLOC", "GLIBC_TUNABLES"), env_extra)
    return out[0], int(out[1])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt is Linux's")
def test_training_keeps_freed_host_memory_for_reuse():
    """After keep_freed_host_memory a freed 64 MiB block is reused without faulting its 16 k
    pages back in; glibc's default (BITLM_MALLOC=system, or the user's own MALLOC_ variable)
    unmaps it and every new block faults all its pages again."""
    applied, faults = _faults({})
    assert applied == "True" and faults < 1000
    for opt_out in ({"BITLM_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "1"}):
        applied, faults = _faults(opt_out)
        assert applied == "False" and faults > 4 * 15000, opt_out


_THREADS = """
import torch
from bitlm import kernels, parallel as P
print(P.kernel_threads_like_torch(), torch.get_num_threads(), kernels.num_threads())
"""


def test_training_sizes_the_kernel_pool_like_torch():
    """A training process (torchrun sets OMP_NUM_THREADS=1 per rank) runs bitlm's kernels on
    torch's thread count, not one thread per CPU; BITLM_NUM_THREADS still wins."""
    from bitlm import kernels

    if kernels.backend() != "native":
        pytest.skip("the reference backend has no thread pool")

    def run(extra):
        return [int(x) for x in _child_words(_THREADS, ("BITLM_NUM_THREADS", "OMP_NUM_THREADS"), extra)]

    assert run({"OMP_NUM_THREADS": "1"}) == [1, 1, 1]
    assert run({"OMP_NUM_THREADS": "1", "BITLM_NUM_THREADS": "3"}) == [3, 1, 3]
