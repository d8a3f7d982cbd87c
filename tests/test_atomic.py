"""bitlm.io.atomic: the one crash-safe write helper (normal modes, nothing half-written)."""

from __future__ import annotations

import os
import shutil
import stat
import sys

import pytest

from bitlm.io.atomic import atomic_dir, atomic_write, atomic_write_bytes, umask


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_file_mode_follows_umask(tmp_path):
    p = atomic_write_bytes(tmp_path / "a.bin", b"xyz")
    assert p.read_bytes() == b"xyz"
    assert _mode(p) == 0o666 & ~umask()  # not mkstemp's 0600
    old = os.umask(0o077)
    try:
        q = atomic_write_bytes(tmp_path / "b.bin", b"1")
    finally:
        os.umask(old)
    assert _mode(q) == 0o600


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    p = tmp_path / "a.bin"
    atomic_write_bytes(p, b"old")

    def boom(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_bytes() == b"old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bin"]


def test_dir_mode_and_replace(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as t:
        (t / "f").write_text("one")
    assert _mode(d) == 0o777 & ~umask()  # not mkdtemp's 0700
    with atomic_dir(d) as t:
        (t / "f").write_text("two")
    assert (d / "f").read_text() == "two"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]  # old folder and temp gone


def test_failed_dir_keeps_old_checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    with atomic_dir(d) as t:
        (t / "f").write_text("one")
    with pytest.raises(KeyError), atomic_dir(d) as t:
        (t / "f").write_text("half")
        raise KeyError("crash while writing")
    assert (d / "f").read_text() == "one"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]


# --- overwriting a folder never leaves the path without a complete one ------------------------


def _write_version(folder, v):
    for name in ("a", "b", "c"):
        (folder / name).write_text(v)


def _complete_version(folder):
    """The version a folder holds if it is complete (all three files, same content), else None."""
    try:
        vals = {(folder / n).read_text() for n in ("a", "b", "c")}
    except OSError:
        return None
    return vals.pop() if len(vals) == 1 else None


class Crash(BaseException):
    """A process death at a chosen point (BaseException: nothing is meant to catch it)."""


def _instrument(monkeypatch, final, crash_at, seen):
    """Wrap every file-system step atomic_dir takes after the temp folder is written: before each
    one, record which complete version ``final`` holds, and die at step number ``crash_at``."""
    import bitlm.io.atomic as A

    count = {"n": 0}

    def wrap(fn):
        def step(*a, **k):
            seen.append(_complete_version(final))
            count["n"] += 1
            if count["n"] == crash_at:
                raise Crash
            return fn(*a, **k)

        return step

    for name in ("_exchange", "fsync_dir", "_fsync_file"):
        monkeypatch.setattr(A, name, wrap(getattr(A, name)))
    monkeypatch.setattr(A.os, "replace", wrap(os.replace))
    monkeypatch.setattr(A.os, "chmod", wrap(os.chmod))
    monkeypatch.setattr(A.shutil, "rmtree", wrap(A.shutil.rmtree))
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_overwrite_crash_at_any_step_leaves_a_complete_folder(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    crash_at, finished = 1, False
    while not finished:
        with monkeypatch.context() as mp:
            if final.exists():
                shutil.rmtree(final)
            with atomic_dir(final) as t:
                _write_version(t, "old")
            seen = []
            count = _instrument(mp, final, crash_at, seen)
            try:
                with atomic_dir(final) as t:
                    _write_version(t, "new")
                finished = True
            except Crash:
                pass
        seen.append(_complete_version(final))
        assert None not in seen, f"crash at step {crash_at}: the path lacked a complete folder at some step ({seen})"
        crash_at += 1
    assert _complete_version(final) == "new"
    assert crash_at > count["n"] > 5  # every step was a crash point once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2(RENAME_EXCHANGE) is Linux-only")
def test_overwrite_swaps_in_one_exchange_on_linux(tmp_path, monkeypatch):
    """The old folder is never renamed aside first (that leaves a moment without one)."""
    import bitlm.io.atomic as A

    final = tmp_path / "ckpt"
    with atomic_dir(final) as t:
        _write_version(t, "old")
    calls = []
    real = A._exchange
    monkeypatch.setattr(A, "_exchange", lambda a, b: calls.append((a, b)) or real(a, b))
    monkeypatch.setattr(A.os, "replace", lambda *a: pytest.fail(f"os.replace{a} while overwriting a folder"))
    with atomic_dir(final) as t:
        _write_version(t, "new")
    assert len(calls) == 1 and calls[0][1] == final
    assert _complete_version(final) == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ckpt"]
