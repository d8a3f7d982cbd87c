"""Progress that fits where it is shown (issue 16): ``bitlm.data.common.progress`` redraws a tqdm
bar on a terminal and writes plain, bounded lines anywhere else — checked on the helper itself
(fake clock) and on the real training loop, with output to a file and on a pseudo-terminal."""

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest
import torch

import bitlm
from bitlm.data.common import Progress, progress


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_plain(n: int, dt: float, **kw) -> list[str]:
    clock, out = _Clock(), io.StringIO()
    with progress(total=n, desc="train b1.58", unit="step", stream=out, clock=clock, interval_s=30.0, **kw) as bar:
        for i in range(n):
            clock.t += dt
            bar.set_postfix(**{"loss": f"{3.0 - i / n:.3f}", "tok/s": "1,234"})
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    return text.splitlines()


def test_plain_lines_every_30s_with_step_loss_rate_and_eta():
    lines = _run_plain(1000, 0.1)  # 100 s of work: lines at 30, 60 and 90 s, then the closing line
    assert len(lines) == 4, lines
    assert lines[0].startswith("train b1.58: step 300/1,000 (30%), loss 2.701, tok/s 1,234, elapsed 30s, ETA 1m10s")
    assert lines[-1].startswith("train b1.58: step 1,000/1,000 (100%)") and lines[-1].endswith("done")


def test_plain_lines_per_step_interval_are_bounded_by_steps():
    lines = _run_plain(1000, 0.001, every=100)  # 1 s of work: one line per 100 steps, no duplicate at the end
    assert len(lines) == 10 and all(f"step {k * 100:,}/" in ln for k, ln in enumerate(lines, 1))


def test_plain_mode_is_quiet_for_a_blink_and_off_when_disabled():
    assert _run_plain(50, 0.001) == []  # done in 0.05 s: no line at all
    out = io.StringIO()
    for _ in progress(range(10), stream=out, enabled=False):
        pass
    assert out.getvalue() == ""


def test_terminal_gets_a_redrawing_bar_and_env_forces_plain(monkeypatch):
    out = _TTY()
    for _ in progress(range(5), desc="eval", stream=out):
        pass
    assert "\r" in out.getvalue() and "eval" in out.getvalue()
    monkeypatch.setenv("BITLM_PROGRESS", "plain")
    assert Progress(range(3), stream=_TTY()).mode == "plain"


# ---------------------------------------------------------------------------------------------
# the real training loop, in a subprocess: output to a file, and on a pseudo-terminal
# ---------------------------------------------------------------------------------------------

STEPS = 12


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on a mat and dog ran far away from big red house with small green door".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (120,), generator=g)) for _ in range(30)]
    (d / "t.txt").write_text("\n\n".join(paras) + "\n")
    return d


def _cmd(corpus: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "bitlm.cli", "train", "--preset", "tiny", "--data", str(corpus / "t.txt"),
            "--out", str(out), "--max-steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--eval-every", "4"]


def _env(corpus: Path, **extra: str) -> dict[str, str]:
    src = str(Path(bitlm.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BITLM_")}
    env.update(PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               BITLM_CACHE=str(corpus / "cache"), OMP_NUM_THREADS="1", **extra)
    return env


def test_train_to_a_file_writes_plain_lines_no_redraws(corpus, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as f:  # stdout and stderr both to one file, as `bitlm train > log 2>&1`
        r = subprocess.run(_cmd(corpus, tmp_path / "run"), env=_env(corpus, BITLM_PROGRESS_INTERVAL="0"),
                           stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert r.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text
    # interval 0: a line per step, each with the step, loss, tokens/s and ETA; nothing else repeats
    steps = [ln for ln in text.splitlines() if ln.startswith("train b1.58: step ")]
    assert len(steps) == STEPS, text
    assert all(" loss " in ln and " tok/s " in ln for ln in steps)
    assert "ETA" in steps[0] and steps[-1].endswith("done")
    assert len(text.splitlines()) < STEPS + 20


@pytest.mark.parametrize("rows_cols", [(24, 100), (0, 0)], ids=["sized", "no-size"])
def test_train_on_a_terminal_redraws_a_bar(corpus, tmp_path, rows_cols):
    master, slave = pty.openpty()
    # a bare pty reports 0 columns (docker -t, script): the bar must still show
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *rows_cols, 0, 0))
    p = subprocess.Popen(_cmd(corpus, tmp_path / "run"), env=_env(corpus), stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            if not ready:
                break
            try:
                b = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(master)
        rc = p.wait(timeout=60)
    text = b"".join(chunks).decode(errors="replace")
    assert rc == 0, text
    assert "\r" in text and "train b1.58:" in text and "12/12" in text  # tqdm redraws its line
    assert not any(ln.startswith("train b1.58: step ") for ln in text.replace("\r", "\n").splitlines())
