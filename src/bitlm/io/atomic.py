"""Crash-safe writes: the one helper every bitlm writer uses.

A file is written to a temp sibling, flushed and fsynced, given the normal mode for a new file
(``0o666`` less the process umask; ``mkstemp``'s private ``0o600`` never leaks through), renamed
over the target, and the folder is fsynced so that the rename itself survives a power cut.
A folder (a checkpoint, an HF export) is built in a temp sibling folder (mode ``0o777`` less the
umask; every file in it gets a new file's mode, whatever its writer used — safetensors writes
``0o600`` — and is fsynced), then swapped with the old folder in one ``renameat2
(RENAME_EXCHANGE)`` call where the kernel has it, so that the target path always names a
complete folder, the old one or the new one.  On failure nothing at the target changes and the
temp sibling is removed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_dir", "umask", "fsync_dir"]


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    m = os.umask(0o022)
    os.umask(m)
    return m


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a folder so that renames and creations inside it are durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write a temp sibling of ``path``, then make it ``path`` atomically.

    ``write`` receives the temp file's path (it exists, empty) and may open it or hand it to a
    library (``safetensors.save_file``, ``torch.save``, ``np.save`` on an open file, ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS (filesystem or kernel without it): fall back to two renames


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp folder beside ``final``; on success it replaces ``final`` atomically.

    Every regular file written into the temp folder is fsynced before the swap.  An existing
    ``final`` is exchanged with the new folder in one step where the kernel supports it (the
    path never lacks a complete folder), else renamed aside just before the new one moves in.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~umask())
        yield tmp
        mask = umask()
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                p = Path(root, d)
                if not p.is_symlink():
                    os.chmod(p, 0o777 & ~mask)
            for f in files:
                p = Path(root, f)
                if p.is_file() and not p.is_symlink():
                    # writers inside the folder may create files private (safetensors: 0o600;
                    # shutil.copy2 keeps the source's mode): give them a new file's mode
                    executable = os.stat(p).st_mode & 0o111
                    os.chmod(p, (0o777 if executable else 0o666) & ~mask)
                    _fsync_file(p)
            fsync_dir(root)
        if final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
            fsync_dir(final.parent)
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now names the old folder
            return
        old = None
        if final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
