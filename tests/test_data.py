"""Tests for bitlm.data: format readers on hand-built fixtures, the fixed split, tokenizer and
token cache, deterministic batches, and (marked ``network``) the real Debian corpus."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlm import data as D

try:
    from _data_writers import (
        RWriter,
        book_block,
        r_serialize,
        write_deb,
        write_r_lazyload,
        write_ztext_testament,
    )
except ImportError:  # tests/ turned into a package
    from ._data_writers import (
        RWriter,
        book_block,
        r_serialize,
        write_deb,
        write_r_lazyload,
        write_ztext_testament,
    )

# ------------------------------------------------------------------------------------------------
# SWORD zText / OSIS
# ------------------------------------------------------------------------------------------------


def test_osis_to_text_spacing_notes_titles_entities():
    v = (
        '<w lemma="strong:H0430">God</w><note placement="foot"><reference>1:1 </reference>a note</note>'
        '<w lemma="x">created</w> the <w>heavens</w>,<note n="b">another</note><w>and</w> '
        "<transChange>the</transChange> earth<note>x</note>. &amp; &lt;ok&gt;"
    )
    assert D.osis_to_text(v) == "God created the heavens, and the earth. & <ok>"
    # non-canonical titles vanish, canonical ones (psalm superscriptions) are text
    assert D.osis_to_text('<title type="main">Genesis</title>In the beginning') == "In the beginning"
    t = '<title canonical="true" type="psalm">A Psalm by David.</title><l sID="1"/>Yahweh is my shepherd<l eID="1"/>'
    assert D.osis_to_text(t) == "A Psalm by David. Yahweh is my shepherd"
    # poetry lines are words apart; no newline survives; leftover USFM markers go
    assert D.osis_to_text("<l>one line</l><l>two\nlines</l>") == "one line two lines"
    assert D.osis_to_text(r"the \nd LORD said") == "the LORD said"
    assert D.osis_to_text('<chapter osisID="Gen.1" sID="Gen.1"/>') == ""


GEN = [
    ["In the beginning, God<note>n</note>created the heavens and the earth.", "The earth was formless."],
    ["Thus the heavens &amp; the earth were finished."],
]
HOS = [["Yahweh’s word that came to Hosea."], ["Say to your brothers, “My people!”"]]
MATT = [["The book of the genealogy of Jesus Christ,"], ["Now when Jesus was born in Bethlehem"]]


def _write_bible(module_dir: Path) -> None:
    preface = '<div type="front" sID="f1"/><title>Preface</title>This is a preface.<div eID="f1"/> '
    # Hosea has no book milestone: the reader must start it at its first chapter
    ot = [book_block("Gen", GEN, intro=preface), book_block("Hos", HOS, milestone=False)]
    rev = book_block("Matt", MATT)
    rev[-1] += '<div type="glossary" sID="g"/><title>Glossary</title><item>Abba means father.</item>'
    write_ztext_testament(module_dir, "ot", ot)
    write_ztext_testament(module_dir, "nt", [rev])


def test_ztext_reader_recovers_exact_verses(tmp_path):
    _write_bible(tmp_path)
    books = D.read_ztext_module(tmp_path)
    assert [b for b, _ in books] == ["front", "Gen", "Hos", "Matt", "back"]
    text = dict(books)
    assert text["front"] == "This is a preface."
    assert text["Gen"].split("\n") == [
        "In the beginning, God created the heavens and the earth.",
        "The earth was formless.",
        "Thus the heavens & the earth were finished.",
    ]
    assert text["Hos"].split("\n") == [
        "Yahweh’s word that came to Hosea.",
        "Say to your brothers, “My people!”",
    ]
    assert text["Matt"].split("\n") == [v for ch in MATT for v in ch]
    assert text["back"] == "Abba means father."


def test_ztext_entry_over_64k_is_not_truncated(tmp_path):
    # the .bzv size field is 16 bits; a longer entry's size is stored modulo 65536
    long_verse = " ".join(f"word{i}" for i in range(12_000))  # ~100 KB
    write_ztext_testament(tmp_path, "ot", [book_block("DanGr", [[long_verse, "Next verse."]])])
    assert dict(D.read_ztext_module(tmp_path))["DanGr"].split("\n") == [long_verse, "Next verse."]


def test_ztext_reader_errors_on_corrupt_block(tmp_path):
    _write_bible(tmp_path)
    bzz = tmp_path / "ot.bzz"
    bzz.write_bytes(b"\x00" * 8 + bzz.read_bytes()[8:])
    with pytest.raises(D.DataError, match="ot.bzz"):
        D.read_ztext_module(tmp_path)


def test_sword_package_reader_uses_conf(tmp_path):
    sword = tmp_path / "usr/share/sword"
    _write_bible(sword / "modules/texts/ztext/test")
    (sword / "mods.d").mkdir(parents=True)
    (sword / "mods.d/test.conf").write_text(
        "[Test]\nDataPath=./modules/texts/ztext/test/\nModDrv=zText\nEncoding=UTF-8\n"
    )
    docs = D.corpus._read_sword_source(tmp_path, "web")
    assert [d.name for d in docs] == ["web/front", "web/Gen", "web/Hos", "web/Matt", "web/back"]
    assert all(d.source == "web" for d in docs)


# ------------------------------------------------------------------------------------------------
# R serialisation and lazy-load databases
# ------------------------------------------------------------------------------------------------


def test_r_unserialize_strings_na_encodings_attributes():
    w = RWriter()
    w.strsxp(["EMMA", "", None, "naïve “quotes” 日本"], attrs={"names": ["a", "b", "c", "d"], "class": ["x"]})
    v = D.r_unserialize(w.getvalue())
    assert list(v) == ["EMMA", "", None, "naïve “quotes” 日本"]
    assert v.rtype == 16
    assert list(v.attrs["names"]) == ["a", "b", "c", "d"] and list(v.attrs["class"]) == ["x"]
    w = RWriter(version=2)  # format 2 has no native-encoding field
    w.strsxp(["café"], enc="latin-1")
    assert list(D.r_unserialize(w.getvalue())) == ["café"]


def test_r_unserialize_lists_ints_refs_altrep():
    w = RWriter()
    w.named_list({"x": [1, None, 3], "names_again": {"inner": ["s"]}})  # "names" symbol is re-referenced
    v = D.r_unserialize(w.getvalue())
    assert list(v.attrs["names"]) == ["x", "names_again"]
    assert list(v[0]) == [1, None, 3]
    assert list(v[1][0]) == ["s"] and list(v[1].attrs["names"]) == ["inner"]

    w = RWriter()
    w.altrep_compact_intseq(5, 10)
    assert list(D.r_unserialize(w.getvalue())) == [10, 11, 12, 13, 14]

    w = RWriter()
    w.altrep_wrap_string(["a", None, "c"], attrs={"names": ["p", "q", "r"]})
    v = D.r_unserialize(w.getvalue())
    assert list(v) == ["a", None, "c"] and v.rtype == 16 and list(v.attrs["names"]) == ["p", "q", "r"]


def test_r_unserialize_rejects_garbage():
    with pytest.raises(D.DataError, match="not an XDR"):
        D.r_unserialize(b"RDX3\n")
    w = RWriter()
    w.strsxp(["abc"])
    with pytest.raises(D.DataError, match="unexpected end"):
        D.r_unserialize(w.getvalue()[:-2], "cut.rds")


@pytest.mark.parametrize("compression", [1, 3])
def test_r_lazyload_roundtrip(tmp_path, compression):
    lines = ["PERSUASION", "", "by Jane Austen", None, "Sir Walter Elliot, of Kellynch Hall"]
    objs = {"persuasion": r_serialize(lines), "emma": r_serialize(["EMMA"])}
    write_r_lazyload(tmp_path / "data/Rdata", objs, compression)
    got = D.read_r_lazyload(tmp_path / "data/Rdata")
    assert list(got) == ["persuasion", "emma"]
    assert list(got["persuasion"]) == lines
    assert list(D.read_r_lazyload(tmp_path / "data/Rdata", ["emma"])) == ["emma"]
    with pytest.raises(D.DataError, match="no object named 'nope'"):
        D.read_r_lazyload(tmp_path / "data/Rdata", ["nope"])


def test_austen_and_mobydick_readers(tmp_path):
    lib = tmp_path / "usr/lib/R/site-library"
    write_r_lazyload(
        lib / "janeaustenr/data/Rdata",
        {"emma": r_serialize(["EMMA", "", "Emma Woodhouse, handsome,   ", None, "clever"])},
    )
    docs = D.corpus._read_austen(tmp_path, "austen")
    assert docs == [D.Document("austen/emma", "EMMA\n\nEmma Woodhouse, handsome,\n\nclever", "austen")]
    moby = (
        "\ufeffThe Project Gutenberg EBook of Moby Dick\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK MOBY"
        " DICK ***\r\n\r\nCall me Ishmael.\r\n\r\n\r\n\r\n\r\n\r\nSome years ago\r\nEnd of Project Gutenberg's"
        " Moby Dick\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\nlicence"
    )
    write_r_lazyload(lib / "tokenizers/data/Rdata", {"mobydick": r_serialize([moby])})
    (doc,) = D.corpus._read_mobydick(tmp_path, "mobydick")
    assert doc.text == "Call me Ishmael.\n\n\nSome years ago"


# ------------------------------------------------------------------------------------------------
# Debian download resolution (fake apt-get; no network)
# ------------------------------------------------------------------------------------------------


def _fake_apt(tmp_path: Path, deb: Path) -> Path:
    """An `apt-get` that knows the package only after `apt-get update`, and logs its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/apt.log\n'
        f'if [ "$1" = update ]; then touch {tmp_path}/updated; exit 0; fi\n'
        f"if [ -f {tmp_path}/updated ]; then cp {deb} .; exit 0; fi\n"
        'echo "E: Unable to locate package $2" >&2; exit 100\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def test_fetch_debian_package_updates_once_as_root_and_caches(tmp_path, monkeypatch):
    deb = tmp_path / "pkg.deb"
    write_deb(deb, "fake-text", {"usr/share/doc/fake/hello.txt": b"hello\n"})
    monkeypatch.setenv("PATH", f"{_fake_apt(tmp_path, deb)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(D.fetch, "_apt_updated", False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    root = D.fetch_debian_package("fake-text", tmp_path / "cache")
    assert (root / "usr/share/doc/fake/hello.txt").read_text() == "hello\n"
    assert (tmp_path / "apt.log").read_text().split("\n")[:3] == [
        "download fake-text",
        "update",
        "download fake-text",
    ]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # temp dirs cleaned up
    # cached: a second call does not run apt at all
    (tmp_path / "apt.log").unlink()
    assert D.fetch_debian_package("fake-text", tmp_path / "cache") == root
    assert not (tmp_path / "apt.log").exists()


def test_fetch_debian_package_not_root_says_what_to_do(tmp_path, monkeypatch):
    deb = tmp_path / "pkg.deb"
    write_deb(deb, "fake-text", {"a.txt": b"a"})
    monkeypatch.setenv("PATH", f"{_fake_apt(tmp_path, deb)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(D.fetch, "_apt_updated", False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(D.DataError, match="apt-get update") as e:
        D.fetch_debian_package("fake-text", tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache/corpus/debs/fake-text").exists()


def test_missing_apt_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(D.DataError, match="apt-get. not found"):
        D.fetch_debian_package("sword-text-web", tmp_path / "cache")


def test_extract_deb_without_dpkg(tmp_path, monkeypatch):
    deb = tmp_path / "x.deb"
    write_deb(deb, "x", {"usr/share/x/odd.txt": b"odd-length!"})
    monkeypatch.setattr(D.fetch.shutil, "which", lambda _name: None)
    D.fetch._extract_deb(deb, tmp_path / "out")
    assert (tmp_path / "out/usr/share/x/odd.txt").read_bytes() == b"odd-length!"


# ------------------------------------------------------------------------------------------------
# The fixed validation split
# ------------------------------------------------------------------------------------------------


def _synthetic_docs() -> list[D.Document]:
    docs = []
    for i in range(5):
        lines = [
            f"Line {j} of document {i}: the quick brown fox jumps over the lazy dog." for j in range(2000)
        ]
        docs.append(D.Document(f"src/doc{i}", "\n".join(lines), "src"))
    return docs


def test_split_is_fixed_contiguous_and_sized():
    docs = _synthetic_docs()
    c = D.split_documents(docs, 0.1, chunk_chars=D.CHUNK_CHARS)
    # the rule is pinned: these names must never change (changing it invalidates every result)
    assert [d.name for d in c.val] == ["src/doc0@0", "src/doc1@3", "src/doc2@8", "src/doc4@10"]
    assert c == D.split_documents(docs, 0.1, chunk_chars=D.CHUNK_CHARS)
    # train pieces + val chunks put back in order rebuild every document exactly
    for d in docs:
        pieces = [p for p in c.train + c.val if p.name.split("#")[0].split("@")[0] == d.name]
        pieces.sort(key=lambda p: d.text.index(p.text))
        assert "".join(p.text for p in pieces) == d.text
    assert 0.03 < c.stats["val_chars"] / (c.stats["val_chars"] + c.stats["train_chars"]) < 0.2
    assert all(p.text.endswith("\n") for p in c.val)  # chunks end at line ends (none is a doc tail here)


def test_split_small_and_degenerate_corpora():
    small = [D.Document("a.txt", "word " * 200)]
    c = D.split_documents(small, 0.03)
    assert len(c.val) == 1 and c.train  # the smallest-hash chunk is held out
    assert D.split_documents(small, 0.0).val == []
    with pytest.raises(D.DataError, match="tiny.txt: corpus too small"):
        D.split_documents([D.Document("t", "hi")], 0.03, where="tiny.txt")
    with pytest.raises(D.DataError, match="empty.txt: no text found"):
        D.split_documents([D.Document("t", "")], 0.03, where="empty.txt")


# ------------------------------------------------------------------------------------------------
# Local sources
# ------------------------------------------------------------------------------------------------

TEXT = "Call me Ishmael. Some years ago—never mind how long precisely—having little money.\n" * 60


def test_txt_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    c = D.load_text_source(str(tmp_path / "a.txt"))
    assert "".join(sorted((d.text for d in c.train + c.val), key=TEXT.index)) == TEXT
    assert c.val and c.stats["sources_chars"] == {"a.txt": len(TEXT)}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/b.txt").write_text("second file " * 100)
    (tmp_path / "ignored.md").write_text("not text")
    c = D.load_text_source(str(tmp_path))
    assert {d.name.split("#")[0].split("@")[0] for d in c.train + c.val} == {"a.txt", "sub/b.txt"}


def test_jsonl_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"story": f"Story {i}: once upon a time there was a fox. " * 5} for i in range(50)]
    p.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    c = D.load_text_source(str(p), text_field="story")
    assert sorted(d.text for d in c.train + c.val) == sorted(r["story"] for r in recs)
    assert len(c.val) >= 1
    with pytest.raises(D.DataError, match=r"d.jsonl:1: record has no field 'text'"):
        D.load_text_source(str(p))
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    cz = D.load_text_source(str(gz), text_field="story")
    assert sorted(d.text for d in cz.train + cz.val) == sorted(r["story"] for r in recs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:2: field 'text' is int"):
        D.load_text_source(str(bad))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"row {i} has some words in it, enough to split. " * 8 for i in range(40)]
    pq.write_table(pa.table({"text": texts, "id": list(range(40))}), tmp_path / "t.parquet")
    c = D.load_text_source(str(tmp_path / "t.parquet"))
    assert sorted(d.text for d in c.train + c.val) == sorted(texts)
    with pytest.raises(D.DataError, match=r"t.parquet: no column 'body'"):
        D.load_text_source(str(tmp_path / "t.parquet"), text_field="body")


def test_empty_corpus_names_the_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(D.DataError, match=r"empty.txt: no text found"):
        D.load_text_source(str(tmp_path / "empty.txt"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match=r"e.jsonl: no text found"):
        D.load_text_source(str(tmp_path / "e.jsonl"))
    (tmp_path / "nodir").mkdir()
    with pytest.raises(D.DataError, match=r"nodir: directory holds no .txt files"):
        D.load_text_source(str(tmp_path / "nodir"))
    with pytest.raises(D.DataError, match=r"no such file, directory or corpus name"):
        D.load_text_source(str(tmp_path / "missing.txt"))
    with pytest.raises(D.DataError, match=r"unknown corpus source 'bogus'"):
        D.load_corpus("default+bogus")


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None, reason="`datasets` is not installed")
def test_hf_spec_with_local_json_builder(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"hf record {i} " * 20}) for i in range(30)))
    c = D.load_text_source("hf:json", hf_kwargs={"data_files": str(p), "cache_dir": str(tmp_path / "hf")})
    assert len(c.train) + len(c.val) == 30 and c.val
    with pytest.raises(D.DataError, match="hf:json: datasets.load_dataset failed"):
        D.load_text_source("hf:json", hf_kwargs={"data_files": str(tmp_path / "missing.jsonl")})


def test_hf_spec_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("no")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(D.DataError, match="pip install datasets"):
        D.load_text_source("hf:roneneldan/TinyStories")


# ------------------------------------------------------------------------------------------------
# Tokenizer and token cache
# ------------------------------------------------------------------------------------------------

UNICODE = "Héllo wörld — “quotes” 日本語 🙂 ﬁ\n\ttabs  and   spaces\r\n<|endoftext|> <|pad|> end "


@pytest.fixture(scope="module")
def small_corpus():
    rng = np.random.default_rng(0)
    words = "the a fox dog jumps over lazy quick brown whale sea ship captain Ahab said “yes” no".split()
    docs = [D.Document(f"d{i}", " ".join(rng.choice(words, 400)) + ".\n", "s") for i in range(30)]
    return D.split_documents(docs, 0.1)


@pytest.fixture(scope="module")
def small_tok(small_corpus, tmp_path_factory):
    return D.train_tokenizer(small_corpus, 400, tmp_path_factory.mktemp("cache"))


def test_tokenizer_roundtrip_ids_and_bytes(small_tok):
    tok = small_tok
    assert tok.vocab_size <= 400 and tok.eos_id == tok.bos_id == 0 and tok.pad_id == 1
    for s in (UNICODE, "", " ", "the lazy dog", "\x00\x01 bytes ÿ"):
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert D.count_token_bytes(ids, tok) == D.utf8_len(s)  # literal specials are plain text
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    tb = D.token_byte_lengths(tok)
    assert tb.shape == (tok.vocab_size,) and tb[tok.eos_id] == 0 and tb[tok.pad_id] == 0
    assert D.count_token_bytes(torch.tensor([tok.eos_id, *tok.encode("ab")]), tok) == 2


def test_tokenizer_save_load(small_tok, tmp_path):
    f = small_tok.save(tmp_path / "tok.json")
    folder = small_tok.save(tmp_path / "hf")
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    for p in (f, folder):
        t = D.load_tokenizer(p)
        assert (
            t.encode(UNICODE) == small_tok.encode(UNICODE) and t.eos_id == 0 and t.hash() == small_tok.hash()
        )
    with pytest.raises(D.DataError, match="tokenizer file not found"):
        D.load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(D.DataError, match="bad.json: not a tokenizers JSON"):
        D.load_tokenizer(tmp_path / "bad.json")


def test_tokenizer_cache_hit_does_not_retrain(small_corpus, tmp_path, monkeypatch):
    t1 = D.train_tokenizer(small_corpus, 300, tmp_path)
    (path,) = (tmp_path / "tokenizers").glob("*/tokenizer.json")
    mtime = path.stat().st_mtime_ns

    def boom(*_a, **_k):
        raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(D.tokenizer, "_train_bpe", boom)
    t2 = D.train_tokenizer(small_corpus, 300, tmp_path)
    assert t2.hash() == t1.hash() and path.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="retrained"):  # another vocab size is another key
        D.train_tokenizer(small_corpus, 320, tmp_path)


def test_tokenizer_training_is_deterministic(small_corpus, tmp_path):
    a = D.train_tokenizer(small_corpus, 300, tmp_path / "a")
    b = D.train_tokenizer(small_corpus, 300, tmp_path / "b")
    assert a.hash() == b.hash()
    sub = D.train_tokenizer(small_corpus, 300, tmp_path / "c", max_chars=5000)
    assert sub.decode(sub.encode(UNICODE)) == UNICODE


def test_token_cache_layout_memmap_and_hit(small_corpus, small_tok, tmp_path, monkeypatch):
    train, val = D.tokenize_corpus(small_corpus, small_tok, tmp_path)
    assert isinstance(train, np.memmap) and train.dtype == np.uint16
    eos = small_tok.eos_id
    expected = [eos]
    for d in small_corpus.train:
        expected += small_tok.encode(d.text) + [eos]
    assert train.tolist() == expected
    assert val[0] == eos and val[-1] == eos and int((val == eos).sum()) == len(small_corpus.val) + 1
    monkeypatch.setattr(
        D.tokens, "_encode_docs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded"))
    )
    train2, _ = D.tokenize_corpus(small_corpus, small_tok, tmp_path)
    assert np.array_equal(train, train2)
    assert D.tokens._token_dtype(65535) == np.uint16 and D.tokens._token_dtype(65536) == np.uint32


def test_prepare_data_end_to_end(tmp_path):
    (tmp_path / "c.txt").write_text(TEXT * 3)
    td = D.prepare_data(str(tmp_path / "c.txt"), vocab_size=300, cache_dir=tmp_path / "cache")
    assert td.stats["train_tokens"] == td.train.size and td.val.size > 0
    x, y = td.batch(step=3, batch_size=2, block_size=16, seed=1)
    assert x.shape == (2, 16)
    (vx, vy), *_ = list(td.val_batches(batch_size=2, block_size=8, max_batches=1))
    assert vx.shape[1] == 8


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------


def test_get_batch_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = D.get_batch(tokens, 4, 32, seed=7, step=11)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y - x, torch.ones_like(x))
    x2, y2 = D.get_batch(tokens, 4, 32, seed=7, step=11)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, D.get_batch(tokens, 4, 32, seed=7, step=12)[0])
    assert not torch.equal(x, D.get_batch(tokens, 4, 32, seed=8, step=11)[0])
    assert not torch.equal(x, D.get_batch(tokens, 4, 32, seed=7, step=11, rank=1)[0])
    # a "resumed" run (steps 5..9 computed fresh) sees exactly the uninterrupted run's batches
    run = [D.get_batch(tokens, 4, 32, seed=7, step=s)[0] for s in range(10)]
    resumed = [D.get_batch(tokens, 4, 32, seed=7, step=s)[0] for s in range(5, 10)]
    assert all(torch.equal(a, b) for a, b in zip(run[5:], resumed))
    # windows stay in range, including the very last possible start
    small = np.arange(33, dtype=np.uint16)
    xs, ys = D.get_batch(small, 8, 32, seed=0, step=0)
    assert torch.equal(xs[0], torch.arange(32)) and int(ys.max()) == 32
    with pytest.raises(D.DataError, match="fewer than block_size"):
        D.get_batch(small, 1, 33, seed=0, step=0)


def test_iter_eval_batches_sequential_nonoverlapping():
    tokens = np.arange(1 + 10 * 8 + 5, dtype=np.uint32)  # 10 full windows of 8 plus a partial tail
    batches = list(D.iter_eval_batches(tokens, 4, 8))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    xs = torch.cat([b[0] for b in batches]).flatten()
    ys = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(xs, torch.arange(80)) and torch.equal(ys, torch.arange(1, 81))
    assert len(list(D.iter_eval_batches(tokens, 4, 8, max_batches=2))) == 2


def test_bits_per_byte():
    assert D.bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
    assert D.utf8_len("é🙂") == 6
    with pytest.raises(D.DataError):
        D.bits_per_byte(1.0, 0)


# ------------------------------------------------------------------------------------------------
# The real thing: Debian packages
# ------------------------------------------------------------------------------------------------


@pytest.mark.network
def test_default_corpus_from_debian(tmp_path):
    c = D.load_corpus("default", cache_dir=tmp_path)
    src = c.stats["sources_chars"]
    assert set(src) == {"web", "austen", "mobydick"}
    assert 4_500_000 < src["web"] < 5_300_000 and 3_800_000 < src["austen"] < 4_200_000
    assert 1_100_000 < src["mobydick"] < 1_300_000
    everything = c.train_text + c.val_text
    assert "It is a truth universally acknowledged" in everything
    assert "In the beginning, God created the heavens and the earth." in everything
    assert "Call me Ishmael." in everything
    assert "PROJECT GUTENBERG EBOOK" not in everything and "Gutenberg-tm" not in everything  # licence cut
    assert "\r" not in everything and "<" not in everything and "\\" not in everything
    frac = c.stats["val_chars"] / (c.stats["val_chars"] + c.stats["train_chars"])
    assert 0.02 < frac < 0.05
    assert {d.source for d in c.val} == {"web", "austen", "mobydick"}  # val shares every register
    again = D.load_corpus("default", cache_dir=tmp_path)  # cached packages, identical split
    assert again.fingerprint() == c.fingerprint()
