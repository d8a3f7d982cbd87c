"""Large host buffers on transparent huge pages (2 MiB) where the OS offers them.

Decode streams ~850 MB of weights per token (2B4T) and, at long contexts, the KV cache too.  On
4 KiB pages that is one TLB miss per 64 cache lines, and in a virtual machine every miss is a
two-level page walk; on 2 MiB pages it is one per 32,768.  Measured on this project's VM (Intel
Xeon, 2 vCPUs; docs/performance.md, "Huge pages"): decode 10-16 % faster with the weights and
the KV cache on huge pages, in interleaved pairs.  (A plain read of one buffer gains less, or
nothing: it differs by ±5 % with where the pages land, either size.)

Linux gives anonymous memory huge pages when ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``always``, or ``madvise`` and the region is advised ``MADV_HUGEPAGE`` — which :class:`Buffer`
does.  File mappings (the packed model's ``mmap``) stay on 4 KiB pages, so
``bitlm.io.packed.read_packed`` reads the file into such a buffer instead.  Where huge pages are
not available (another OS, ``never``, no ``madvise``) the buffers are ordinary anonymous memory:
the same bytes, only the page size differs.  ``BITLM_HUGEPAGES=0`` turns the whole thing off
(file mappings again, and torch's own allocations for the KV cache) — e.g. for several processes
on one model file: a file mapping shares the page cache's one copy among them, while each
process reads its own copy onto huge pages.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

HUGE = 2 << 20  # bytes: the x86-64 transparent huge page
MIN_BYTES = 4 * HUGE  # smaller buffers are left to the ordinary allocators (the page saving is nil)
_THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page policy: "always", "madvise", "never", or "unavailable"
    (no such setting: not Linux, or a kernel without THP)."""
    try:
        text = _THP_SYSFS.read_text()
    except OSError:
        return "unavailable"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unavailable"


def available() -> bool:
    """Whether the kernel gives huge pages to anonymous memory advised ``MADV_HUGEPAGE``."""
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def enabled() -> bool:
    """Whether bitlm puts its large buffers (packed weights, KV caches) on huge pages:
    :func:`available` and ``BITLM_HUGEPAGES`` is not "0"."""
    return os.environ.get("BITLM_HUGEPAGES", "1") != "0" and available()


def proc_bytes(path: str, key: str) -> int | None:
    """The ``key:`` line of a /proc file given in kB (``/proc/meminfo``'s ``MemAvailable``,
    ``/proc/self/status``'s ``VmRSS``), in bytes; None where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def status() -> dict[str, str | bool]:
    """What ``bitlm info`` and the benchmark JSONs report: the kernel's THP setting and whether
    bitlm puts its large buffers on huge pages."""
    return {"thp": thp_mode(), "used": enabled()}


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes (None where there is no such file)."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def worth_it(nbytes: int) -> bool:
    """Whether ``nbytes`` of weights should be copied onto huge pages: :func:`enabled`, at least
    ``MIN_BYTES``, and under 80 % of the memory available — a copy is anonymous memory, which
    unlike a file mapping's pages cannot be dropped and read again under pressure, so a model
    near the machine's memory stays a file mapping."""
    if not enabled() or nbytes < MIN_BYTES:
        return False
    free = mem_available()
    return free is None or nbytes < 0.8 * free


def _advise_huge(mm: mmap.mmap, start: int, length: int) -> None:
    mm.madvise(mmap.MADV_HUGEPAGE, start, length)


class Buffer:
    """``nbytes`` of zeroed, writable anonymous memory whose first byte sits on a 2 MiB boundary,
    advised ``MADV_HUGEPAGE`` (``advised``: whether the kernel took the advice).  :meth:`view` gives torch tensors over it; each holds a reference
    to the mapping (as every ``frombuffer`` view does), so the memory lives as long as they do."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        # private, not shared: shared anonymous memory is shmem, which THP "madvise" does not cover
        self._mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = torch.frombuffer(self._mm, dtype=torch.uint8, count=1).data_ptr()
        self.pad = -addr % HUGE
        self.advised = False
        if nbytes and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                _advise_huge(self._mm, self.pad, nbytes)  # pad: a whole number of pages
                self.advised = True
            except OSError:  # a kernel built without THP: EINVAL; the memory works as it is
                pass

    def memoryview(self) -> memoryview:
        """The ``nbytes`` as a writable memoryview (e.g. for ``file.readinto``)."""
        return memoryview(self._mm)[self.pad : self.pad + self.nbytes]

    def view(self, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
        """``count`` elements of ``dtype`` from byte ``offset``, a 1-D tensor sharing the memory."""
        if offset + count * torch.empty(0, dtype=dtype).element_size() > self.nbytes:
            raise ValueError(f"view of {count} {dtype} at byte {offset} overruns the {self.nbytes}-byte buffer")
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=self.pad + offset)


def zeros(n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
          hugepages: bool | None = None) -> list[torch.Tensor]:
    """``n`` zeroed tensors of ``shape``, side by side in one huge-page :class:`Buffer` when
    ``hugepages`` (default :func:`enabled`; True: wherever :func:`available`) and they take at
    least ``MIN_BYTES`` together (one buffer: a 2 MiB page is the unit the OS hands out, so small
    tensors each on their own would waste most of theirs), else each from torch's allocator.
    The pages are faulted in (written) before this returns."""
    count = 1
    for s in shape:
        count *= s
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    use = enabled() if hugepages is None else hugepages and available()
    if not use or n * nbytes < MIN_BYTES:
        return [torch.zeros(shape, dtype=dtype) for _ in range(n)]
    step = -(-nbytes // 64) * 64  # every tensor 64-byte aligned, as the kernels' loads like it
    buf = Buffer(n * step)
    # fault every page in now (as torch.zeros does): else the first write to each 2 MiB page, in
    # the middle of a prefill, waits for the kernel to find and clear it
    buf.view(torch.uint8, buf.nbytes).zero_()
    return [buf.view(dtype, count, i * step).view(shape) for i in range(n)]


def relocate(tensors: list[torch.Tensor]) -> Buffer | None:
    """Move the storages behind ``tensors`` (CPU) into one huge-page :class:`Buffer`, in place:
    every tensor keeps its identity, shape, strides and values (``Tensor.set_``), so whatever
    holds it reads the new memory, and tensors that were views of one storage stay views of one.
    For weights built in memory (packing a checkpoint, converting a GGUF file) rather than read
    from a packed file.  A storage much larger than what the listed tensors span (a view into
    some big buffer) is left where it is.  Does nothing (returns None) unless :func:`worth_it`
    for the total."""
    groups: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in tensors:
        if t.device.type == "cpu" and t.numel():
            st = t.untyped_storage()
            groups.setdefault(st.data_ptr(), (st, []))[1].append(t)
    todo = []
    for st, ts in groups.values():
        span = max((t.storage_offset() + 1 + sum((n - 1) * d for n, d in zip(t.shape, t.stride()))) * t.element_size()
                   for t in ts)
        if st.nbytes() <= 2 * span:
            todo.append((st, ts))
    steps = [-(-st.nbytes() // 64) * 64 for st, _ in todo]
    if not worth_it(sum(steps)):
        return None
    buf, off = Buffer(sum(steps)), 0
    with torch.inference_mode():  # set_ on inference tensors (made under inference_mode) too
        for (st, ts), step in zip(todo, steps):
            new = buf.view(torch.uint8, st.nbytes(), off)
            new.copy_(torch.empty(0, dtype=torch.uint8).set_(st))
            for t in ts:
                t.set_(new.untyped_storage(), t.storage_offset(), t.shape, t.stride())
            off += step
    return buf
