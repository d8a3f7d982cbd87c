"""What every part of ``bitlm.data`` shares: ``DataError`` (the one-line user-facing error), the
cache root (``$BITLM_CACHE``, default ``~/.cache/bitlm``) — and ``progress``, the one progress
reporter every long task of bitlm uses (training, evaluation, zero-shot tasks, corpus download and
tokenisation, PTQ).

Progress fits where it is shown: on a terminal a redrawing tqdm bar; anywhere else (a file, a pipe,
CI) one plain line per interval — every ``every`` steps when the caller gives a step interval, and
at least every 30 s otherwise (``$BITLM_PROGRESS_INTERVAL`` seconds) — plus one closing line, with
the step, the caller's figures (loss, tokens/s, ...), the elapsed time and the ETA (no closing
line for a task done within a second).  A log never
gets carriage-return redraws, and the number of lines is bounded by the run time / 30 s (plus
total / every).  ``$BITLM_PROGRESS`` forces ``bar``, ``plain`` or ``off``.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO


class DataError(ValueError):
    """A user-facing data problem; the message is one line naming the file, field or package."""


# ------------------------------------------------------------------------------------------------
# cache directory
# ------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The bitlm cache root: ``cache_dir``, else ``$BITLM_CACHE``, else ``~/.cache/bitlm``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BITLM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bitlm"


# ------------------------------------------------------------------------------------------------
# progress
# ------------------------------------------------------------------------------------------------

PLAIN_INTERVAL_S = 30.0
QUIET_BELOW_S = 1.0  # plain mode: no closing line for a task that took less than this and printed none
PROGRESS_MODES = ("bar", "plain", "off")


def _duration(s: float) -> str:
    s = int(round(max(s, 0.0)))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class Progress:
    """A progress reporter: a tqdm bar on a terminal, plain lines elsewhere (see the module doc).

    Use it like tqdm — iterate over it, or ``update(n)``; ``set_postfix(loss=..., tok_s=...)`` sets
    the figures shown; ``write(msg)`` prints a line of the task's own (to stdout) without breaking
    the bar; ``close()`` (or leaving a ``with`` block) ends it.  ``enabled=False`` shows nothing.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        every: int | None = None,
        interval_s: float | None = None,
        leave: bool = False,
        stream: TextIO | None = None,
        mode: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.iterable = iterable
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = every if every and every > 0 else None
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._closed = False
        self._lines = 0
        if interval_s is None:
            env = os.environ.get("BITLM_PROGRESS_INTERVAL")
            try:
                interval_s = float(env) if env else PLAIN_INTERVAL_S
            except ValueError:
                interval_s = PLAIN_INTERVAL_S
        self.interval_s = interval_s
        if not enabled:
            self.mode = "off"
        else:
            self.mode = mode or os.environ.get("BITLM_PROGRESS") or ""
            if self.mode not in PROGRESS_MODES:
                self.mode = "bar" if _isatty(self.stream) else "plain"
        self._t0 = self._last = clock()
        self._n0 = self._last_n = initial
        if self.mode == "bar":
            from tqdm.auto import tqdm

            # a terminal that reports 0 columns (a bare pty: docker -t, script) would get an empty bar
            width = {} if _columns(self.stream) else {"ncols": 100, "nrows": 24}
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=not width, leave=leave,
                             file=self.stream, **width)

    # -- tqdm-like API --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("Progress without an iterable: use update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = self.clock()
            due_step = self.every is not None and self.n // self.every > self._last_n // self.every
            if due_step or now - self._last >= self.interval_s:
                self._emit(now)

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt_value(v) for k, v in kw.items()}, refresh=False)

    def write(self, msg: str) -> None:
        """A line of the task's own (to stdout), e.g. a validation result."""
        if self._bar is not None:
            self._bar.write(msg, file=sys.stdout)
        else:
            print(msg, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "plain" and self.n != self._last_n:
            now = self.clock()
            if self._lines or now - self._t0 >= QUIET_BELOW_S:  # a task done in a blink leaves no line
                self._emit(now, final=True)

    # -- plain lines ----------------------------------------------------------------------------

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The plain line for the current state: ``desc: step n/total (p%), k=v, ..., elapsed, ETA``."""
        now = self.clock() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._n0
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.unit} {self.n:,}" + (f"/{self.total:,} ({100.0 * self.n / self.total:.0f}%)" if self.total else "")
        parts = [head + count]
        parts += [f"{k} {_fmt_value(v)}" for k, v in self.postfix.items()]
        rate = done / elapsed if elapsed > 0 else 0.0
        if rate > 0 and not any(k.endswith("/s") for k in self.postfix):
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_duration(elapsed)}")
        if final or (self.total and self.n >= self.total):
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        return ", ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        self._last, self._last_n = now, self.n
        self._lines += 1
        try:
            print(self.line(now, final), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream never stops the task itself
            pass


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _columns(stream: Any) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return 80  # not a real file descriptor (a test's stream): tqdm's own default applies


def progress(iterable: Iterable[Any] | None = None, **kw: Any) -> Progress:
    """The progress reporter of every long bitlm task (see :class:`Progress` and the module doc)."""
    return Progress(iterable, **kw)
