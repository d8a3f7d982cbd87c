"""bitlm.io.atomic: the one crash-safe write helper (normal modes, nothing half-written)."""

from __future__ import annotations

import os
import stat

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
