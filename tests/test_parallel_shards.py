"""Token shards (bitlm.data.shards): ``bitlm data prepare`` writes fixed-size uint16 shards with
an index and a content hash; training memory-maps them and each data stream (rank × micro-batch)
reads only its own slice."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitlm import cli
from bitlm.data import DataError, ShardData, load_text_source, load_tokenizer, prepare_shards, tokenize_corpus


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    f = d / "corpus.txt"
    words = "ternary weights bits scale absmean token shard rank stream batch".split()
    rng = np.random.default_rng(0)
    f.write_text("".join(" ".join(rng.choice(words, 12)) + ".\n" for _ in range(4000)))
    return f


@pytest.fixture(scope="module")
def shards(corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "sh"
    assert cli.main(["data", "prepare", "--data", str(corpus_file), "--out", str(out), "--vocab-size", "300",
                     "--shard-tokens", "4096"]) == 0
    return out


def test_prepare_writes_fixed_size_shards_with_index_and_hash(shards, corpus_file, tmp_path):
    idx = json.loads((shards / "index.json").read_text())
    assert idx["format"] == "bitlm-shards" and idx["dtype"] == "uint16" and idx["content_sha256"].startswith("sha256:")
    train = idx["splits"]["train"]
    assert len(train) > 2 and all(e["tokens"] == 4096 for e in train[:-1]) and 0 < train[-1]["tokens"] <= 4096
    assert (shards / train[0]["file"]).stat().st_size == 4096 * 2
    # the same tokens, in the same layout, as the token cache
    tok = load_tokenizer(shards / "tokenizer.json")
    want_train, want_val = tokenize_corpus(load_text_source(str(corpus_file)), tok, tmp_path / "cache")
    data = ShardData(shards)
    got = np.concatenate([np.fromfile(shards / e["file"], dtype="<u2") for e in train])
    assert np.array_equal(got, want_train) and np.array_equal(data.val, want_val)
    data.verify()
    # a second preparation with the same tokenizer: the same content hash (not the shard size)
    again = prepare_shards(str(corpus_file), tmp_path / "again", tokenizer=shards / "tokenizer.json", shard_tokens=8192)
    assert again["content_sha256"] == idx["content_sha256"] and len(again["splits"]["train"]) < len(train)


def test_each_stream_reads_only_its_slice(shards):
    data = ShardData(shards, streams=4)
    n = data.stats["train_tokens"]
    flat = np.concatenate([np.asarray(m) for m in data._train.maps]).astype(np.int64)
    for s in range(4):
        lo, hi = data.slice_of(s, 16)
        assert (lo, hi) == (s * n // 4, (s + 1) * n // 4)
        x, y = data.batch(3, 8, 16, seed=1, rank=s)
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            # find the window: it must lie inside the stream's slice
            hits = [i for i in range(lo, hi - 16) if np.array_equal(flat[i : i + 16], row_x)]
            assert hits and np.array_equal(flat[hits[0] + 1 : hits[0] + 17], row_y)
    a, b = data.batch(3, 8, 16, seed=1, rank=2), data.batch(3, 8, 16, seed=1, rank=2)
    assert all((u == v).all() for u, v in zip(a, b))  # a pure function of (seed, step, stream)
    with pytest.raises(DataError, match="data stream 4 of 4"):
        data.batch(0, 2, 16, rank=4)


def test_damaged_shard_is_named(shards, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    f = bad / "train_00001.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(DataError, match="train_00001.bin: 8190 bytes, expected 8192"):
        ShardData(bad)


def test_train_reads_shards(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "tiny", "--data", str(shards), "--max-steps", "2", "--batch-size", "2",
                     "--seq-len", "32", "--grad-accum", "2", "--eval-every", "2", "--out", str(out),
                     "--no-progress"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert (out / "last" / "tokenizer.json").is_file()


def test_vocabularies_past_uint16_get_uint32_shards(shards, corpus_file, tmp_path, monkeypatch):
    """uint16 when the vocabulary fits, else uint32 (issue 11 item 4): the same tokens, read back
    through the index's dtype, with a content hash of their own (it covers the dtype)."""
    import bitlm.data.tokens as TK

    monkeypatch.setattr(TK, "_token_dtype", lambda vocab_size: np.uint32)  # as for a vocabulary > 65535
    idx = prepare_shards(str(corpus_file), tmp_path / "sh32", tokenizer=shards / "tokenizer.json", shard_tokens=4096)
    assert idx["dtype"] == "uint32"
    train = idx["splits"]["train"]
    assert (tmp_path / "sh32" / train[0]["file"]).stat().st_size == 4096 * 4
    a, b = ShardData(shards), ShardData(tmp_path / "sh32")
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val)) and a.stats["train_tokens"] == b.stats["train_tokens"]
    assert all(torch_equal(x, y) for x, y in zip(a.batch(2, 4, 16, seed=3), b.batch(2, 4, 16, seed=3)))
    assert b.stats["content_sha256"] != a.stats["content_sha256"]
    b.verify()


def torch_equal(x, y) -> bool:
    import torch

    return x.dtype == y.dtype and torch.equal(x, y)
