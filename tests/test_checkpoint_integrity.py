"""Native checkpoints detect corruption: SHA-256 of every file (and of the metadata) recorded in
config.json when saving, verified when loading; ``verify=False`` / ``BITLM_VERIFY=0`` skip it;
checkpoints written before checksums existed still load."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from bitlm.config import preset
from bitlm.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bitlm.model import BitNetModel
from helpers import random_data


def _model(seed=0) -> BitNetModel:
    torch.manual_seed(seed)
    return BitNetModel(preset("tiny"))


def flip_tensor_byte(st: Path, where: float = 0.5) -> None:
    """Flip one bit of one byte inside the tensor data of a safetensors file (the header stays
    valid, so only a checksum can tell)."""
    raw = bytearray(st.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n
    i = start + int((len(raw) - start) * where)
    raw[i] ^= 0x10
    st.write_bytes(bytes(raw))


def _same(a: BitNetModel, b: BitNetModel) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_checksums_recorded(tmp_path):
    ck = save_checkpoint(_model(), tmp_path / "ck", optimizer_state={"s": torch.ones(3)})
    meta = json.loads((ck / "config.json").read_text())
    assert set(meta["checksums"]) == {"config.json", "model.safetensors", "optimizer.pt"}
    assert all(v.startswith("sha256:") and len(v) == 7 + 64 for v in meta["checksums"].values())


def test_flipped_byte_in_tensor_data_is_refused(tmp_path, monkeypatch):
    m = _model()
    ck = save_checkpoint(m, tmp_path / "ck")
    flip_tensor_byte(ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"ck/model\.safetensors: corrupt"):
        load_checkpoint(ck)
    # what verification prevents: unverified, the flip loads as a silently different model
    m2, _ = load_checkpoint(ck, verify=False)
    assert not _same(m, m2)
    monkeypatch.setenv("BITLM_VERIFY", "0")
    m3, _ = load_checkpoint(ck)
    assert not _same(m, m3)
    monkeypatch.setenv("BITLM_VERIFY", "1")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt"):
        load_checkpoint(ck)


def test_bitlm_load_and_cli_refuse_a_corrupt_checkpoint(tmp_path, capsys):
    import bitlm
    from bitlm.cli import main

    ck = save_checkpoint(_model(), tmp_path / "ck")
    flip_tensor_byte(ck / "model.safetensors", 0.9)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bitlm.load(ck)
    rc = main(["info", "--model", str(ck)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.safetensors: corrupt" in err[0], err


def test_metadata_values_are_covered(tmp_path):
    ck = save_checkpoint(_model(), tmp_path / "ck", step=12)
    text = (ck / "config.json").read_text()
    assert '"rope_theta": 10000.0' in text
    (ck / "config.json").write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 10001.0'))  # valid JSON
    with pytest.raises(CheckpointError, match="config.json: corrupt"):
        load_checkpoint(ck)
    assert load_checkpoint(ck, verify=False)[0].config.rope_theta == 10001.0
    # reformatting (same values) is not corruption
    meta = json.loads(text)
    (ck / "config.json").write_text(json.dumps(meta, indent=None, sort_keys=True))
    assert load_checkpoint(ck)[1]["step"] == 12


def test_tokenizer_file_is_covered(tmp_path):
    from bitlm.data import EOS_TOKEN, PAD_TOKEN, Tokenizer
    from bitlm.data.tokenizer import _train_bpe

    tok = Tokenizer(_train_bpe(["the cat sat on the mat. " * 20], 270), EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    ck = save_checkpoint(_model(), tmp_path / "ck", tokenizer=tok)
    tj = ck / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"the"', '"thE"', 1))
    with pytest.raises(CheckpointError, match="tokenizer.json: corrupt"):
        load_checkpoint(ck)


def test_old_checkpoint_without_checksums_loads(tmp_path):
    m = _model()
    ck = save_checkpoint(m, tmp_path / "ck", step=3)
    meta = json.loads((ck / "config.json").read_text())
    del meta["checksums"]  # as written before checksums existed
    (ck / "config.json").write_text(json.dumps(meta, indent=2))
    m2, meta2 = load_checkpoint(ck)
    assert meta2["step"] == 3 and _same(m, m2)


def test_lora_checkpoint_covers_the_adapters(tmp_path):
    import bitlm
    from bitlm.lora import ADAPTER_FILE, add_lora, save_lora_checkpoint

    m = add_lora(_model(), rank=2, alpha=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    save_lora_checkpoint(m, tmp_path / "run")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {ADAPTER_FILE, "adapter_config.json", "model.safetensors", "config.json"} <= set(meta["checksums"])
    bitlm.load(tmp_path / "run")  # intact: loads
    flip_tensor_byte(tmp_path / "run" / ADAPTER_FILE)
    with pytest.raises(CheckpointError, match="adapter.safetensors: corrupt"):
        bitlm.load(tmp_path / "run")


def test_resume_refuses_a_corrupt_optimizer_state(tmp_path, monkeypatch):
    from bitlm.train import TrainConfig, train

    cfg = preset("tiny", vocab_size=64, max_seq_len=32)

    def tc(steps):
        return TrainConfig(max_steps=steps, batch_size=2, seq_len=16, eval_every=0, progress=False,
                           out_dir=str(tmp_path / "run"))

    train(cfg, tc(2), random_data(), log=lambda *a: None)
    opt = tmp_path / "run" / "last" / "optimizer.pt"
    raw = bytearray(opt.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    opt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"last/optimizer\.pt: corrupt"):
        train(cfg, tc(4), random_data(), resume=True, log=lambda *a: None)
    # unverified (or a checkpoint from before checksums), a torn file is still named, not a traceback
    monkeypatch.setenv("BITLM_VERIFY", "0")
    opt.write_bytes(bytes(raw[: len(raw) // 3]))
    with pytest.raises(CheckpointError, match=r"last/optimizer\.pt: corrupt or truncated"):
        train(cfg, tc(4), random_data(), resume=True, log=lambda *a: None)
