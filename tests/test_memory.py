"""Huge-page buffers (bitlm.memory) and the engine's use of them: the packed weights read from a
file or built in memory, and the KV cache.  The page size must change nothing but speed: every
test compares the huge-page model with the 4 KiB one bit for bit."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from bitlm import memory
from bitlm.engine import convert, load_packed, save_packed
from bitlm.io.packed import ALIGN, PackedFormatError, read_packed, write_packed
from bitlm.kernels import native
from helpers import decode_greedy, tiny_model

HUGE = 2 << 20


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping holding address ``ptr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and head and head[0] == "VmFlags:":
                return head[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_buffer_is_aligned_zeroed_and_bounded():
    b = memory.Buffer(3 * HUGE + 100)
    t = b.view(torch.uint8, b.nbytes)
    assert t.data_ptr() % HUGE == 0 and t.numel() == 3 * HUGE + 100
    assert int(t.sum()) == 0
    f = b.view(torch.float32, 10, offset=64)
    f.fill_(1.5)
    assert t[64:68].view(torch.float32).item() == 1.5  # views share the memory
    with pytest.raises(ValueError, match="overruns"):
        b.view(torch.float32, 10, offset=b.nbytes - 8)


@pytest.mark.skipif(not memory.available(), reason="this OS gives no transparent huge pages to advised memory "
                                                   "(not Linux, or THP set to never): buffers are plain memory")
def test_buffer_is_advised_huge_pages():
    b = memory.Buffer(4 * HUGE)
    assert b.advised
    assert "hg" in _vm_flags(b.view(torch.uint8, 1).data_ptr())  # MADV_HUGEPAGE is set on the mapping
    t = torch.zeros(4 * HUGE, dtype=torch.uint8)  # torch's own allocation: not advised
    assert "hg" not in _vm_flags(t.data_ptr())


def test_a_refused_advice_leaves_plain_memory(monkeypatch):
    def refuse(mm, start, length):  # a kernel built without THP answers MADV_HUGEPAGE with EINVAL
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(memory, "_advise_huge", refuse)
    b = memory.Buffer(HUGE)
    assert not b.advised
    t = b.view(torch.int32, 16)
    t.fill_(7)
    assert int(t.sum()) == 112


def test_zeros_share_one_buffer_without_overlap(monkeypatch):
    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    monkeypatch.setattr(memory, "available", lambda: True)
    ts = memory.zeros(5, (3, 1000, 700), torch.float16)  # 5 x 4.2 MB: over MIN_BYTES together
    ptrs = [t.data_ptr() for t in ts]
    assert ptrs[0] % HUGE == 0 and all(p % 64 == 0 for p in ptrs)
    assert all(b - a >= 3 * 1000 * 700 * 2 for a, b in zip(ptrs, ptrs[1:]))
    for i, t in enumerate(ts):
        assert t.shape == (3, 1000, 700) and t.dtype == torch.float16 and t.is_contiguous()
        t.fill_(i + 1)
    assert [float(t.min()) for t in ts] == [float(t.max()) for t in ts] == [1, 2, 3, 4, 5]


def test_zeros_fall_back_to_torch(monkeypatch):
    def refuse(n):
        raise AssertionError("Buffer made")

    monkeypatch.setattr(memory, "Buffer", refuse)
    monkeypatch.setattr(memory, "available", lambda: True)
    monkeypatch.setenv("BITLM_HUGEPAGES", "0")  # turned off
    assert [t.sum().item() for t in memory.zeros(2, (4096, 4096), torch.float32)] == [0, 0]
    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    assert memory.zeros(3, (100,), torch.int8)[0].shape == (100,)  # too small to be worth a buffer


def test_worth_it_keeps_big_models_on_file_mappings(monkeypatch):
    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    monkeypatch.setattr(memory, "available", lambda: True)
    monkeypatch.setattr(memory, "mem_available", lambda: 10 << 30)
    assert memory.worth_it(1 << 30)
    assert not memory.worth_it(9 << 30)  # over 80 % of the available memory
    assert not memory.worth_it(memory.MIN_BYTES - 1)
    monkeypatch.setenv("BITLM_HUGEPAGES", "0")
    assert not memory.worth_it(1 << 30)


def test_relocate_keeps_identity_values_and_sharing(monkeypatch):
    monkeypatch.setattr(memory, "worth_it", lambda n: True)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1000, generator=g)
    view = a[10:20]  # a view of a's storage: must stay one
    b = torch.randint(-128, 127, (33, 7), dtype=torch.int8, generator=g)
    with torch.inference_mode():  # the engine builds some tensors under inference_mode
        c = torch.randn(5, generator=g)
    p = torch.nn.Parameter(torch.randn(16, generator=g))
    p_alias = p.detach()  # a second tensor object on the parameter's storage (as a bf16 head holds it)
    big = torch.zeros(100_000)
    corner = big[:10]  # a small view into a big storage: left where it is
    before = [t.clone() for t in (a, b, c, p)]
    corner_ptr = corner.data_ptr()
    buf = memory.relocate([a, b, view, a, c, p, p_alias, corner, torch.empty(0)])
    assert buf is not None and buf.nbytes == 4032 + 256 + 64 + 64  # each storage once, 64-byte aligned
    assert a.data_ptr() % HUGE == 0 and b.data_ptr() == a.data_ptr() + 4032
    assert view.data_ptr() == a.data_ptr() + 40 and view.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert p.data_ptr() == p_alias.data_ptr() and p.requires_grad and isinstance(p, torch.nn.Parameter)
    assert corner.data_ptr() == corner_ptr
    for t, ref in zip((a, b, c, p), before):
        assert torch.equal(t, ref)
    a.add_(1)  # still an ordinary tensor, and the view sees it
    assert torch.equal(a, before[0] + 1) and torch.equal(view, a[10:20])
    monkeypatch.setattr(memory, "worth_it", lambda n: False)
    assert memory.relocate([torch.ones(3)]) is None


def test_read_packed_into_huge_pages_is_the_same(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randint(0, 255, (3, 70), dtype=torch.uint8, generator=g),
          "b": torch.randn(2, 3, generator=g).to(torch.bfloat16), "empty": torch.empty(0, dtype=torch.int8)}
    p = write_packed(tmp_path / "x.bitlm", {"format": "i2"}, ts, tokenizer="{}")
    h1, mapped, mm = read_packed(p, hugepages=False)
    h2, read, buf = read_packed(p, hugepages=True)
    assert isinstance(buf, memory.Buffer) and h1 == h2
    for name, t in ts.items():
        assert torch.equal(read[name], t) and torch.equal(mapped[name], t) and read[name].dtype == t.dtype
    e = next(e for e in h1["tensors"] if e["name"] == "b")
    raw = bytearray(p.read_bytes())
    hlen = struct.unpack("<Q", raw[16:24])[0]
    raw[-(-(24 + hlen) // ALIGN) * ALIGN + e["offset"]] ^= 0xFF
    del mapped, mm
    p.write_bytes(bytes(raw))
    with pytest.raises(PackedFormatError, match="'b' is corrupt"):  # the CRC check reads the buffer
        read_packed(p, hugepages=True)


def test_packed_model_and_cache_on_huge_pages_decode_the_same(tmp_path, monkeypatch):
    """A packed file read into a huge-page buffer, a model converted in memory and relocated,
    and a KV cache on huge pages all decode exactly as the file mapping with torch's caches."""
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native.reason()}")
    model = tiny_model("tiny-2b4t", sharpen=50, sharpen_head=False, max_seq_len=96)
    monkeypatch.setenv("BITLM_HUGEPAGES", "0")
    base = convert(model, "i2", head="int8")
    path = save_packed(base, tmp_path / "m.bitlm")
    prompt = torch.randint(0, base.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    ref_toks, ref, _ = decode_greedy(load_packed(path), prompt, 12, True, "f16")

    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    monkeypatch.setattr(memory, "MIN_BYTES", 0)
    monkeypatch.setattr(memory, "available", lambda: True)
    loaded = load_packed(path)
    assert isinstance(loaded._mmap, memory.Buffer)
    built = convert(model, "i2", head="int8")
    for pm in (loaded, built):
        w = pm.layers[0].q.data
        assert w.data_ptr() % 64 == 0 and torch.equal(w, base.layers[0].q.data)
        toks, out, cache = decode_greedy(pm, prompt, 12, True, "f16")
        assert toks == ref_toks and torch.equal(out, ref)
        k0, v0 = cache.k[0].data_ptr(), cache.v[0].data_ptr()
        assert k0 % HUGE == 0 and v0 == k0 + cache.k[0].numel() * 2  # one buffer: k then v per layer
    first = built.layers[0].q.data.data_ptr()
    assert first % HUGE == 0  # relocated: the first packed tensor opens the buffer


def test_bitlm_info_reports_huge_pages(monkeypatch, capsys):
    from bitlm.cli import main

    monkeypatch.setattr(memory, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(memory, "available", lambda: True)
    monkeypatch.setenv("BITLM_HUGEPAGES", "0")
    assert main(["info"]) == 0
    assert "huge pages: off (kernel THP setting: madvise; BITLM_HUGEPAGES=0)" in capsys.readouterr().out
    monkeypatch.setenv("BITLM_HUGEPAGES", "1")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["environment"]["hugepages"] == {"thp": "madvise", "used": True}
