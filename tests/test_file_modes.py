"""Every artefact bitlm writes has the modes of a normally created file: ``0o666 & ~umask`` for
files, ``0o777 & ~umask`` for folders (``bitlm.io.atomic``).  Temp-file helpers create files
``0o600`` and folders ``0o700``, and safetensors writes its files ``0o600``: a model saved that
way is unreadable to the group / other users who are meant to serve or share it."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from bitlm.config import ModelConfig, preset
from bitlm.model import BitNetModel
from helpers import random_data

UMASK = 0o027  # group may read, others nothing: differs from both 0o600 and the usual 0o644
FILE, DIR = 0o666 & ~UMASK, 0o777 & ~UMASK


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def assert_normal_modes(*paths: Path) -> None:
    """Each path and, for folders, everything inside: files FILE, folders DIR."""
    bad = []
    for top in paths:
        assert top.exists(), top
        for p in [top, *sorted(top.rglob("*"))] if top.is_dir() else [top]:
            want = DIR if p.is_dir() else FILE
            if _mode(p) != want:
                bad.append(f"{p.name}: {oct(_mode(p))} (want {oct(want)})")
    assert not bad, bad


def assert_no_temp_left(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith(".")]
    assert not left, left


@pytest.fixture(scope="module")
def tok():
    from bitlm.data import EOS_TOKEN, PAD_TOKEN, Tokenizer
    from bitlm.data.tokenizer import _train_bpe

    return Tokenizer(_train_bpe(["the cat sat on the mat. " * 40] * 4, 280), EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


def tiny_gguf_model() -> BitNetModel:
    torch.manual_seed(0)  # d = 256: one TQ block per row, as GGUF needs
    return BitNetModel(ModelConfig(arch="bitnet-b1.58", vocab_size=300, d_model=256, n_layers=1, n_heads=4,
                                   n_kv_heads=2, d_ff=256, max_seq_len=32, tie_embeddings=True)).eval()


def test_native_checkpoint_folder(tmp_path, umask, tok):
    from bitlm.io.checkpoint import save_checkpoint

    m = BitNetModel(preset("tiny"))
    ck = save_checkpoint(m, tmp_path / "ck", optimizer_state={"x": torch.zeros(2)}, tokenizer=tok)
    assert {p.name for p in ck.iterdir()} == {"config.json", "model.safetensors", "optimizer.pt", "tokenizer.json"}
    assert_normal_modes(ck)
    save_checkpoint(m, ck, step=2)  # overwriting an existing checkpoint too
    assert_normal_modes(ck)
    assert_no_temp_left(tmp_path)


def test_lora_adapters_and_lora_checkpoint(tmp_path, umask):
    from bitlm.lora import add_lora, save_lora, save_lora_checkpoint

    m = add_lora(BitNetModel(preset("tiny")), rank=2, alpha=4)
    save_lora(m, tmp_path / "ad")
    save_lora(m, tmp_path / "one.safetensors")
    save_lora_checkpoint(m, tmp_path / "run")
    assert_normal_modes(tmp_path / "ad", tmp_path / "one.safetensors", tmp_path / "one.json", tmp_path / "run")
    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert_no_temp_left(tmp_path)


def test_tokenizer_files(tmp_path, umask, tok):
    tok.save(tmp_path / "tok.json")
    tok.save(tmp_path / "tokdir")  # HF layout: tokenizer.json + tokenizer_config.json
    assert_normal_modes(tmp_path / "tok.json", tmp_path / "tokdir")
    assert_no_temp_left(tmp_path)


def test_packed_file_and_bitlm_pack(tmp_path, umask, tok, capsys):
    from bitlm.cli import main
    from bitlm.engine import pack, save_packed
    from bitlm.io.checkpoint import save_checkpoint

    m = BitNetModel(preset("tiny"))
    save_packed(pack(m, "i2"), tmp_path / "a.bitlm", tokenizer=tok)
    ck = save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    assert main(["pack", "--model", str(ck), "--out", str(tmp_path / "b.bitlm"), "--format", "t1"]) == 0
    assert_normal_modes(tmp_path / "a.bitlm", tmp_path / "b.bitlm")
    assert_no_temp_left(tmp_path)


def test_gguf_and_its_tokenizer(tmp_path, umask, tok):
    from bitlm.io.gguf import save_gguf, tokenizer_sidecar

    p = save_gguf(tiny_gguf_model(), tmp_path / "m.gguf", tokenizer=tok)
    assert tokenizer_sidecar(p).is_file()
    assert_normal_modes(p, tokenizer_sidecar(p))
    assert_no_temp_left(tmp_path)


@pytest.mark.parametrize("shard", [None, 40_000])
def test_hf_export_folder(tmp_path, umask, tok, shard):
    from bitlm.io.hf import save_hf

    out = save_hf(tiny_gguf_model(), tmp_path / "hf", tokenizer=tok.backend, max_shard_bytes=shard)
    names = {p.name for p in out.iterdir()}
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    assert_normal_modes(out)
    assert_no_temp_left(tmp_path)


def test_hf_export_copies_a_private_tokenizer_with_normal_modes(tmp_path, umask, tok):
    from bitlm.io.hf import save_hf

    src = tmp_path / "src.tokenizer.json"
    tok.save(src)
    os.chmod(src, 0o600)  # shutil.copy2 would carry this mode over
    out = save_hf(tiny_gguf_model(), tmp_path / "hf", tokenizer=src)
    assert_normal_modes(out)


def test_training_run_folder(tmp_path, umask):
    from bitlm.train import TrainConfig, train

    data = random_data()
    tc = TrainConfig(max_steps=2, batch_size=2, seq_len=16, eval_every=0, log_every=1, progress=False,
                     out_dir=str(tmp_path / "run"))
    train(preset("tiny", vocab_size=64, max_seq_len=32), tc, data, log=lambda *a: None)
    assert_normal_modes(tmp_path / "run")
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_token_cache(tmp_path, umask, tok):
    from bitlm.data import prepare_data

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat.\n\n" * 200)
    os.chmod(text, FILE)
    prepare_data(str(text), tokenizer=tok, cache_dir=tmp_path / "cache")
    assert_normal_modes(tmp_path / "cache")
