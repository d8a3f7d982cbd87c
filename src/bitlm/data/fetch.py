"""Debian packages as a data source: ``apt-get download`` + ``dpkg -x`` (or a stdlib ar/tar
reader) into ``$BITLM_CACHE/corpus``, cached and atomic.  No network besides apt.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .common import DataError, cache_root

# ------------------------------------------------------------------------------------------------
# Debian packages: apt-get download + dpkg -x, cached and atomic
# ------------------------------------------------------------------------------------------------

_COMPLETE_MARKER = ".bitlm-complete"
# apt says one of these when the package lists are missing or stale (fixable by apt-get update)
_APT_NO_LISTS = (
    "Unable to locate package",
    "has no installation candidate",
    "Can't select",
    "No packages found",
)
_apt_updated = False  # apt-get update is attempted at most once per process


def _run_apt(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise DataError(
            f"`{args[0]}` not found: the default corpus is fetched with Debian's apt; "
            "on another system pass a local text file instead (e.g. --data corpus.txt)"
        ) from None


def _last_line(s: str) -> str:
    lines = [ln.strip() for ln in s.strip().splitlines() if ln.strip() and not ln.startswith("W:")]
    return lines[-1] if lines else "(no output)"


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download package`` into ``dest``; one ``apt-get update`` retry when lists are missing."""
    global _apt_updated
    for attempt in (0, 1):
        r = _run_apt(["apt-get", "download", package], dest)
        debs = sorted(dest.glob("*.deb"))
        if r.returncode == 0 and debs:
            return debs[0]
        msg = r.stderr + r.stdout
        no_lists = any(s in msg for s in _APT_NO_LISTS)
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        if attempt == 0 and no_lists and is_root and not _apt_updated:
            _apt_updated = True
            print(f"bitlm: apt has no list for {package}; running `apt-get update` once", file=sys.stderr)
            _run_apt(["apt-get", "update"], dest)
            continue
        if no_lists:
            raise DataError(
                f"apt-get download {package} failed: apt knows no such package; run "
                f"`sudo apt-get update` (Debian 12 'main' has {package}) or pass a local text file"
            )
        raise DataError(f"apt-get download {package} failed: {_last_line(msg)}")
    raise AssertionError("unreachable")  # pragma: no cover


def _extract_deb(deb: Path, dest: Path) -> None:
    """Unpack the data part of a .deb into ``dest`` (``dpkg-deb -x``; stdlib ar+tar if it is absent)."""
    if shutil.which("dpkg-deb"):
        r = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"dpkg-deb -x {deb.name} failed: {_last_line(r.stderr)}")
        return
    # A .deb is an ar archive: "!<arch>\n", then 60-byte member headers (name 16, size at 48..58).
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise DataError(f"{deb}: not a Debian package (no ar magic)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode("ascii", "replace").strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode("ascii").strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(dest, filter="data")
                    else:  # pragma: no cover - Python < 3.11.4
                        tar.extractall(dest)
            except tarfile.TarError as e:
                raise DataError(f"{deb.name}: cannot unpack {name} without dpkg-deb ({e})") from None
            return
        pos += 60 + size + (size & 1)  # members are 2-byte aligned
    raise DataError(f"{deb}: no data.tar member")


def fetch_debian_package(package: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download and unpack a Debian package (no root needed); return the unpacked root directory.

    Cached under ``<cache>/corpus/debs/<package>``; the work happens in a temporary sibling
    directory renamed into place at the end, so an interrupted run never leaves a half tree.
    """
    base = cache_root(cache_dir) / "corpus" / "debs"
    final = base / package
    if (final / _COMPLETE_MARKER).is_file():
        return final
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base, prefix=f".{package}."))
    try:
        # apt (running as root) hands the download to the unprivileged `_apt` user; let it in.
        os.chmod(tmp, 0o755)
        deb = _apt_download(package, tmp)
        root = tmp / "root"
        root.mkdir()
        _extract_deb(deb, root)
        (root / _COMPLETE_MARKER).write_text(deb.name + "\n")
        if final.exists():  # a stale, incomplete tree (or another process won the race)
            if (final / _COMPLETE_MARKER).is_file():
                return final
            shutil.rmtree(final)
        try:
            os.replace(root, final)
        except OSError:
            if not (final / _COMPLETE_MARKER).is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
