"""Bad input to every ``bitlm`` verb ends in one line ``bitlm VERB: error: ...`` that names the
file or field at fault, exit status 2, and no traceback.

The table crosses the verbs (``bitlm.cli.VERBS``) with the kinds of mistake a user makes: a path
that does not exist, the wrong kind of file (a text file, a packed file where trainable weights
are needed, a folder without config.json), a corrupt file (truncated safetensors / .bitlm /
GGUF, a garbage optimizer.pt), a bad option value, and a missing optional package.  Cells that do
not apply to a verb (``energy`` reads no model file) are simply not in the table.  The cases run
in-process through ``bitlm.cli.main``; the missing-package cases run in one subprocess whose
import system refuses the package, as on a machine without it.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bitlm.cli import VERBS, main

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Tiny good files and their broken variants, built once: name -> path."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    from bitlm.config import preset
    from bitlm.data import Tokenizer
    from bitlm.engine import convert, save_packed
    from bitlm.io.checkpoint import save_checkpoint
    from bitlm.model import BitNetModel

    d = tmp_path_factory.mktemp("cli_errors")
    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend)
    torch.manual_seed(0)
    model = BitNetModel(preset("tiny", max_seq_len=64))
    f = {"dir": str(d), "missing": str(d / "no-such-model"), "ck": str(save_checkpoint(model, d / "ck", tokenizer=tok))}
    f["packed"] = str(save_packed(convert(model), d / "m.bitlm", tokenizer=tok))
    grouped = BitNetModel(preset("tiny", max_seq_len=64, weight_groups=2, weight_group_dim="parallel", act_groups=2,
                                 norm_groups=2, group_scope="parallel"))
    f["ck_grouped"] = str(save_checkpoint(grouped, d / "ck-grouped", tokenizer=tok))
    # a teacher with another vocabulary (bitlm train --teacher)
    f["ck_v384"] = str(save_checkpoint(BitNetModel(preset("tiny", quant="fp", vocab_size=384, max_seq_len=64)),
                                       d / "ck-v384"))
    f["ck_a48"] = str(save_checkpoint(BitNetModel(preset("tiny", max_seq_len=64, act_variant="a4.8")), d / "ck-a48",
                                      tokenizer=tok))
    (d / "notes.txt").write_text(TEXT)
    f["text"] = str(d / "notes.txt")
    (d / "nocfg").mkdir()
    (d / "nocfg" / "model.safetensors").write_bytes(b"\0" * 64)
    f["nocfg"] = str(d / "nocfg")
    (d / "badshards").mkdir()
    (d / "badshards" / "index.json").write_text('{"format": "something-else"}')
    # corrupt files: the good ones cut short
    shutil.copytree(d / "ck", d / "ck-trunc")
    st = d / "ck-trunc" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    f["ck_trunc"] = str(d / "ck-trunc")
    raw = Path(f["packed"]).read_bytes()
    (d / "trunc.bitlm").write_bytes(raw[: len(raw) // 2])
    f["packed_trunc"] = str(d / "trunc.bitlm")
    (d / "garbage.bitlm").write_bytes(b"BITLMPAK" + b"\x07" * 40)
    f["packed_garbage"] = str(d / "garbage.bitlm")
    (d / "trunc.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (9).to_bytes(8, "little")
                                   + (20).to_bytes(8, "little") + b"\x05\x00")  # header, then nothing
    f["gguf_trunc"] = str(d / "trunc.gguf")
    # a Llama folder whose weights are cut short (bitlm convert / bitlm.load's HF path)
    (d / "llama").mkdir()
    (d / "llama" / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    (d / "llama" / "model.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    f["llama_trunc"] = str(d / "llama")
    # config files for train / energy
    (d / "cfg-train-key.json").write_text(json.dumps({"model": {"d_model": 64}, "train": {"foo": 1}}))
    f["cfg_train_key"] = str(d / "cfg-train-key.json")
    (d / "cfg-train-only.json").write_text(json.dumps({"train": {"max_steps": "many"}}))
    f["cfg_train_type"] = str(d / "cfg-train-only.json")
    (d / "cfg-model-type.json").write_text(json.dumps({"model": {"d_model": "wide"}}))
    f["cfg_model_type"] = str(d / "cfg-model-type.json")
    (d / "cfg-bad.json").write_text("{not json")
    f["cfg_bad"] = str(d / "cfg-bad.json")
    # a real one-step run to --resume from, then copies with a broken optimizer.pt / weights
    common = ["--preset", "tiny", "--set", "max_seq_len=64", "--data", f["text"], "--tokenizer", f["ck"],
              "--seq-len", "16", "--batch-size", "2", "--eval-every", "0", "--no-progress"]
    f["train_args"] = shlex.join(common)
    assert main(["train", *common, "--max-steps", "1", "--out", str(d / "run")]) == 0
    shutil.copytree(d / "run", d / "run-badopt")
    (d / "run-badopt" / "last" / "optimizer.pt").write_bytes(b"this is not a torch file\n" * 4)
    f["run_badopt"] = str(d / "run-badopt")
    shutil.copytree(d / "run", d / "run-trunc")
    st = d / "run-trunc" / "last" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:100])
    f["run_trunc"] = str(d / "run-trunc")
    f["run_none"] = str(d / "run-none")
    return f


def _patched(src: Path, dst: Path, old: bytes, new: bytes, before: int | None = None) -> str:
    """``src`` with the last occurrence of ``old`` (before byte ``before``) replaced by ``new``."""
    data = bytearray(src.read_bytes())
    at = data.rfind(old, 0, before)
    assert at >= 0 and len(old) == len(new), (old, new)
    data[at:at + len(old)] = new
    dst.write_bytes(bytes(data))
    return str(dst)


@pytest.fixture(scope="module")
def gguf_files(files) -> dict[str, str]:
    """Broken variants of a good I2_S GGUF (bitnet.cpp's type, arch bitnet-b1.58): name -> path.
    Each one is what another writer, a cut download or a different build could hand bitlm."""
    pytest.importorskip("gguf")
    from bitlm.config import preset
    from bitlm.io.checkpoint import save_checkpoint
    from bitlm.io.gguf import read_gguf, save_gguf
    from bitlm.model import BitNetModel

    d = Path(files["dir"]) / "gguf"
    d.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = BitNetModel(preset("tiny-2b4t", d_model=128, d_ff=256, max_seq_len=64))  # rows of 128: I2_S blocks
    good = save_gguf(model, d / "good.gguf", ternary_type="i2_s")
    with read_gguf(good) as f:
        infos = {n: (i.offset, i.nbytes, i.dims) for n, i in f.tensors.items()}
        assert f.metadata["general.architecture"] == "bitnet-b1.58"
        assert f.tensors["blk.0.attn_q.weight"].type_name == "I2_S"
    header_end = min(off for off, _, _ in infos.values())
    raw = good.read_bytes()
    g = {}

    def info_record(name: str) -> bytes:  # the tensor-info record: name, n_dims, dims, type id
        dims = infos[name][2]
        return (len(name).to_bytes(8, "little") + name.encode() + len(dims).to_bytes(4, "little")
                + b"".join(x.to_bytes(8, "little") for x in dims))

    # the unused two-bit code 0b11 in the first block of attn_q
    bad = bytearray(raw)
    bad[infos["blk.0.attn_q.weight"][0]] = 0xFF
    (d / "code3.gguf").write_bytes(bytes(bad))
    g["gguf_code3"] = str(d / "code3.gguf")
    # a ggml type id no runtime defines (99) on attn_v
    rec = info_record("blk.0.attn_v.weight")
    g["gguf_type"] = _patched(good, d / "type.gguf", rec + (36).to_bytes(4, "little"), rec + (99).to_bytes(4, "little"),
                              header_end)
    # an architecture no runtime defines, same length as bitnet-b1.58
    key = b"general.architecture" + (8).to_bytes(4, "little") + (12).to_bytes(8, "little")  # string value
    g["gguf_arch"] = _patched(good, d / "arch.gguf", key + b"bitnet-b1.58", key + b"bitnet-b9.99", header_end)
    # the download cut one byte short of the last tensor's end
    last = max(infos, key=lambda n: infos[n][0])
    (d / "cut.gguf").write_bytes(raw[: infos[last][0] + infos[last][1] - 1])
    assert last == "blk.1.ffn_down.weight"
    g["gguf_cut"] = str(d / "cut.gguf")
    # an I2_S tensor whose bytes do not fit its shape: attn_k says 32 rows, its data holds 64
    rec = info_record("blk.0.attn_k.weight")
    assert infos["blk.0.attn_k.weight"][2] == (128, 64)
    g["gguf_i2s_size"] = _patched(good, d / "size.gguf", rec, rec[:-8] + (32).to_bytes(8, "little"), header_end)
    # a model with two weight scales per projection, for the one-scale I2_S / IQ2_BN files
    wg = BitNetModel(preset("tiny-2b4t", d_model=128, d_ff=256, max_seq_len=64, weight_groups=2))
    g["ck_wgroups"] = str(save_checkpoint(wg, d / "ck-wgroups"))
    shutil.copy(Path(files["ck"]) / "tokenizer.json", d / "ck-wgroups" / "tokenizer.json")
    return g


# (id, argv with {name} placeholders for files, what the one error line must name)
MODEL_VERBS = {  # verb -> extra arguments it needs besides --model
    "eval": "--text 'the cat'",
    "generate": "--prompt 'the cat' --max-new-tokens 2",
    "chat": "--max-new-tokens 2",
    "info": "",
    "pack": "--out {dir}/out.bitlm",
    "export": "--format hf --out {dir}/out-hf",
    "train": "{train_args} --max-steps 1 --out {dir}/run-init --init-from",  # --model → --init-from
    "serve": "--port 0 --parallel 1",  # loads after the port is open: a bad model stops the server
}


def _model_cases() -> list[tuple[str, str, str]]:
    cases = []
    for verb, extra in MODEL_VERBS.items():
        flag = "" if verb == "train" else "--model"
        for kind, needle in (("missing", "no-such-model"), ("text", "notes.txt"), ("nocfg", "nocfg"),
                             ("ck_trunc", "model.safetensors"), ("packed_trunc", "trunc.bitlm"),
                             ("packed_garbage", "garbage.bitlm")):
            cases.append((f"{verb}-{kind}", f"{verb} {extra} {flag} {{{kind}}}", needle))
    # corrupt GGUF (needs the gguf package to get as far as reading it)
    for verb in ("info", "eval", "pack"):
        cases.append((f"{verb}-gguf_trunc", f"{verb} {MODEL_VERBS[verb]} --model {{gguf_trunc}}", "trunc.gguf"))
    return cases


CASES: list[tuple[str, str, str]] = _model_cases() + [
    # wrong kind: a packed file where trainable weights are needed
    ("pack-packed", "pack --model {packed} --out {dir}/again.bitlm", "m.bitlm"),
    ("export-packed", "export --model {packed} --format gguf --out {dir}/x.gguf", "m.bitlm"),
    ("train-init-packed", "train {train_args} --max-steps 1 --out {dir}/run-p --init-from {packed}", "m.bitlm"),
    # group quantisation into formats that hold one scale per tensor (or no grouped norms)
    ("export-hf-groups", "export --model {ck_grouped} --format hf --out {dir}/g-hf", "norm_groups=2"),
    ("export-val-tokens", "export --model {ck_grouped} --format hf --out {dir}/g-hf --requantize --val-tokens 1",
     "--val-tokens"),
    # GGUF files of the BitNet runtimes that bitlm must not read as a model (bitlm.io.gguf_types)
    ("eval-gguf-code3", "eval --model {gguf_code3} --text 'the cat'", "'blk.0.attn_q.weight' (I2_S) holds the unused code 0b11"),
    ("generate-gguf-type", "generate --model {gguf_type} --prompt hi --max-new-tokens 1",
     "tensor 'blk.0.attn_v.weight' has unknown ggml type 99"),
    ("pack-gguf-arch", "pack --model {gguf_arch} --out {dir}/a.bitlm", "architecture 'bitnet-b9.99'"),
    ("info-gguf-cut", "info --model {gguf_cut}", "tensor 'blk.1.ffn_down.weight' is truncated"),
    ("eval-gguf-i2s-size", "eval --model {gguf_i2s_size} --text 'the cat'",
     "tensor 'blk.0.attn_k.weight' (I2_S, dims [128, 32]) has 2080 bytes before the next tensor; its type needs 1056"),
    ("export-gguf-i2s-groups", "export --model {ck_wgroups} --format gguf --gguf-type i2_s --out {dir}/g.gguf",
     "q_proj: 2 weight scale groups"),
    ("export-gguf-iq2bn-groups", "export --model {ck_wgroups} --format gguf --gguf-type iq2_bn --out {dir}/g.gguf",
     "q_proj: 2 weight scale groups"),
    # tokenizers and data that are not what they claim
    ("eval-tokenizer-text", "eval --model {ck} --text 'the cat' --tokenizer {text}", "notes.txt"),
    ("eval-tokenizer-missing", "eval --model {ck} --text 'the cat' --tokenizer {dir}/tok.json", "tok.json"),
    ("eval-data-missing", "eval --model {ck} --data {dir}/nodata.txt", "nodata.txt"),
    ("generate-tokenizer-missing", "generate --model {ck} --prompt hi --tokenizer {dir}/tok.json", "tok.json"),
    ("train-data-missing", "train --preset tiny --max-steps 1 --data {dir}/nodata.txt --out {dir}/r", "nodata.txt"),
    ("train-tokenizer-text", "train --preset tiny --max-steps 1 --data {text} --tokenizer {text} --out {dir}/r",
     "notes.txt"),
    # bad option values
    ("eval-tasks-unknown", "eval --model {ck} --tasks nosuchtask", "nosuchtask"),
    ("eval-seq-len", "eval --model {ck} --text 'the cat' --seq-len 0", "--seq-len"),
    ("eval-batch-size", "eval --model {ck} --text 'the cat' --batch-size 0", "--batch-size"),
    ("eval-max-tokens", "eval --model {ck} --text 'the cat' --max-tokens -1", "--max-tokens"),
    ("generate-max-new-tokens", "generate --model {ck} --prompt hi --max-new-tokens -1", "--max-new-tokens"),
    ("generate-temperature", "generate --model {ck} --prompt hi --temperature -1", "temperature"),
    ("generate-top-p", "generate --model {ck} --prompt hi --top-p 2", "top_p"),
    ("generate-top-k", "generate --model {ck} --prompt hi --top-k 0", "top_k"),
    ("chat-max-new-tokens", "chat --model {packed} --max-new-tokens -1", "--max-new-tokens"),
    # knowledge distillation (bitlm.distill)
    ("train-teacher-missing", "train {train_args} --max-steps 1 --out {dir}/r --teacher {missing}", "no-such-model"),
    ("train-teacher-vocab", "train {train_args} --max-steps 1 --out {dir}/r --teacher {ck_v384}", "384 tokens"),
    ("train-teacher-packed", "train {train_args} --max-steps 1 --out {dir}/r --teacher {packed}", "m.bitlm"),
    ("train-kd-temperature", "train {train_args} --max-steps 1 --out {dir}/r --teacher {ck} --kd-temperature 0",
     "--kd-temperature"),
    ("train-kd-layer-no-teacher", "train {train_args} --max-steps 1 --out {dir}/r --kd-attention-layer 1",
     "--kd-attention-layer"),
    ("train-kd-layer-range", "train {train_args} --max-steps 1 --out {dir}/r --teacher {ck} --kd-attention-layer 9",
     "--kd-attention-layer 9"),
    # few-shot evaluation
    ("eval-num-fewshot-negative", "eval --model {ck} --tasks arc_easy --num-fewshot -1", "--num-fewshot"),
    ("eval-num-fewshot-no-tasks", "eval --model {ck} --text 'the cat' --num-fewshot 2", "--num-fewshot"),
    # head / KV types the file or the architecture cannot hold
    ("pack-embed-int4", "pack --model {ck} --out {dir}/e.bitlm --head int4 --embed int4", "--embed"),
    ("pack-head-int3", "pack --model {ck} --out {dir}/e.bitlm --head int3", "--head"),
    ("generate-kv-checkpoint", "generate --model {ck} --prompt hi --kv int8", "--kv int8"),
    ("eval-kv-checkpoint", "eval --model {ck} --text 'the cat' --kv f16", "--kv f16"),
    ("chat-kv-unknown", "chat --model {packed} --kv int4", "--kv"),
    ("train-negative-steps", "train {train_args} --max-steps -3 --out {dir}/r", "max_steps"),
    ("train-unknown-preset", "train --preset nosuch --max-steps 1", "nosuch"),
    ("train-set-no-equals", "train --preset tiny --set d_model --max-steps 1", "d_model"),
    ("train-set-unknown", "train --preset tiny --set colour=red --max-steps 1", "colour"),
    ("train-set-bad-int", "train --preset tiny --set d_model=wide --max-steps 1", "d_model"),
    ("train-train-set-unknown", "train --preset tiny --train-set colour=red --max-steps 1", "colour"),
    ("train-set-with-init", "train {train_args} --max-steps 1 --out {dir}/r --init-from {ck} --set d_model=32",
     "--set"),
    ("train-act-variant-unknown", "train --preset tiny --max-steps 1 --act-variant a2", "act_variant"),
    ("train-init-act-variant-unknown", "train --init-from {ck} --data {text} --seq-len 16 --batch-size 2 "
     "--max-steps 1 --out {dir}/r --act-variant a2", "--act-variant a2"),
    ("export-act-variant", "export --model {ck_a48} --format hf --out {dir}/v-hf", "act_variant='a4.8'"),
    ("train-config-missing", "train --config {dir}/nocfg.json --max-steps 1", "nocfg.json"),
    ("train-config-bad-json", "train --config {cfg_bad} --max-steps 1", "cfg-bad.json"),
    ("train-config-train-key", "train --config {cfg_train_key} --max-steps 1", "'foo'"),
    ("train-config-train-type", "train --preset tiny --config {cfg_train_type}", "max_steps"),
    ("train-config-model-type", "train --config {cfg_model_type} --max-steps 1", "d_model"),
    # --resume: nothing there, corrupt optimizer state, corrupt weights
    ("train-resume-none", "train {train_args} --max-steps 2 --out {run_none} --resume", "run-none"),
    ("train-resume-badopt", "train {train_args} --max-steps 2 --out {run_badopt} --resume", "optimizer.pt"),
    ("train-resume-trunc", "train {train_args} --max-steps 2 --out {run_trunc} --resume", "model.safetensors"),
    # --resume of a checkpoint from another model config or another data-parallel layout (issue 11)
    ("train-resume-other-config", "train {train_args} --max-steps 2 --out {dir}/run --resume --set d_model=32",
     "model config mismatch on resume (field 'd_model'"),
    ("train-resume-other-layout", "train {train_args} --max-steps 2 --out {dir}/run --resume --grad-accum 2",
     "global batch mismatch on resume"),
    # convert: only a Llama / Mistral / Qwen2 folder will do
    ("convert-missing", "convert --model {missing} --out {dir}/cv", "no-such-model"),
    ("convert-text", "convert --model {text} --out {dir}/cv", "notes.txt: a file"),
    ("convert-nocfg", "convert --model {nocfg} --out {dir}/cv", "nocfg"),
    ("convert-bitlm-checkpoint", "convert --model {ck} --out {dir}/cv", "ck"),
    ("convert-trunc", "convert --model {llama_trunc} --out {dir}/cv", "model.safetensors"),
    ("convert-calibration-missing", "convert --model {llama_trunc} --out {dir}/cv --sub-norms rmsnorm "
     "--tokenizer-from {ck} --calibration-text {dir}/nocal.txt", "nocal.txt"),
    # energy: presets and config files, no model file
    ("energy-unknown-preset", "energy --preset nosuch", "nosuch"),
    ("energy-config-missing", "energy --config {dir}/nocfg.json", "nocfg.json"),
    ("energy-config-bad-json", "energy --config {cfg_bad}", "cfg-bad.json"),
    ("energy-config-model-type", "energy --config {cfg_model_type}", "d_model"),
    ("energy-set-unknown", "energy --preset tiny --set colour=red", "colour"),
    ("energy-seq-len", "energy --preset tiny --seq-len 0", "--seq-len"),
    # demo
    ("demo-unknown-preset", "demo --preset nosuch --out {dir}/demo", "nosuch"),
    ("demo-set-unknown", "demo --preset tiny --set colour=red --out {dir}/demo", "colour"),
    ("demo-negative-steps", "demo --preset tiny --max-steps -1 --out {dir}/demo", "--max-steps"),
    ("demo-minutes", "demo --preset tiny --minutes 0 --out {dir}/demo", "--minutes"),
    ("demo-batch-size", "demo --preset tiny --batch-size 0 --max-steps 1 --out {dir}/demo", "--batch-size"),
    ("demo-data-missing", "demo --preset tiny --max-steps 1 --data {dir}/nodata.txt --out {dir}/demo", "nodata.txt"),
    # devices, data parallelism, distributed checkpoints
    ("train-device-unknown", "train --preset tiny --max-steps 1 --device tpu", "--device 'tpu'"),
    ("train-parallel-no-torchrun", "train --preset tiny --max-steps 1 --parallel ddp", "--parallel ddp needs torchrun"),
    ("train-precision", "train --preset tiny --max-steps 1 --train-set precision=fp16", "--precision 'fp16'"),
    # tensor parallelism
    ("train-tp-heads", "train --preset tiny --max-steps 1 --tp 3", "--tp 3 does not divide the model's n_heads=4"),
    ("train-tp-kv-heads", "train --preset tiny-2b4t --max-steps 1 --tp 4", "n_kv_heads=2"),
    ("train-tp-ffn", "train --preset tiny --max-steps 1 --tp 2 --set d_ff=161", "ffn width (d_ff)=161"),
    ("train-tp-vocab", "train --preset tiny --max-steps 1 --tp 2 --set vocab_size=511", "vocab_size=511"),
    ("train-tp-no-torchrun", "train --preset tiny --max-steps 1 --tp 2", "--tp 2 needs torchrun"),
    ("train-tp-global-groups", "train --preset tiny --max-steps 1 --tp 2 --tp-quant global --set act_groups=2",
     "--tp-quant global: the model config has act_groups=2"),
    ("train-tp-zero", "train --preset tiny --max-steps 1 --tp 0", "--tp must be >= 1"),
    ("data-missing", "data prepare --data {dir}/nodata.txt --out {dir}/sh", "nodata.txt"),
    ("data-shard-tokens", "data prepare --data {text} --out {dir}/sh --shard-tokens 10", "--shard-tokens"),
    ("train-shards-bad-index", "train --preset tiny --max-steps 1 --data {dir}/badshards --out {dir}/r", "index.json"),
    ("checkpoint-missing", "checkpoint consolidate {dir}/nodcp --out {dir}/c", "nodcp"),
    ("checkpoint-native", "checkpoint consolidate {ck} --out {dir}/c", "not a distributed bitlm checkpoint"),
    # experiment
    ("experiment-unknown", "experiment nosuch --quick --out {dir}/ex", "nosuch"),
    ("experiment-negative-steps", "experiment compare --quick --steps -1 --out {dir}/ex", "--steps"),
    ("experiment-scale", "experiment compare --scale 0 --out {dir}/ex", "--scale"),
    ("experiment-lrs", "experiment lr --quick --lrs 1e-3,fast --out {dir}/ex", "--lrs"),
    ("experiment-widths", "experiment scaling --quick --widths 64,wide --out {dir}/ex", "--widths"),
    ("experiment-data-missing", "experiment compare --quick --data {dir}/nodata.txt --out {dir}/ex", "nodata.txt"),
    ("experiment-tasks-unknown", "experiment compare --quick --tasks nosuchtask --out {dir}/ex", "nosuchtask"),
    ("experiment-teacher-other", "experiment compare --quick --teacher {ck} --out {dir}/ex", "--teacher"),
    ("experiment-teacher-vocab", "experiment distill --quick --teacher {ck} --out {dir}/ex", "512 tokens"),
    ("experiment-teacher-missing", "experiment distill --quick --teacher {missing} --out {dir}/ex", "no-such-model"),
    ("experiment-device-unknown", "experiment compare --quick --device tpu --out {dir}/ex", "--device 'tpu'"),
]


def test_table_covers_every_verb():
    assert {argv.split()[0] for _, argv, _ in CASES} == set(VERBS)


def _check_one_line(verb: str, rc: int, out: str, err: str, needle: str) -> None:
    assert "Traceback" not in out + err, err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bitlm {verb}: error: "), err
    assert needle in lines[0], (needle, err)


@pytest.mark.parametrize("case_id,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case_id, argv, needle, files, capsys, monkeypatch, request):
    if "gguf" in case_id:
        pytest.importorskip("gguf")
    if "{gguf_" in argv or "{ck_wgroups}" in argv:
        files = {**files, **request.getfixturevalue("gguf_files")}
    monkeypatch.setenv("BITLM_DEBUG", "")  # the one-line form even where a developer set it
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("hello\n"))  # chat
    args = shlex.split(argv.format(**files))
    capsys.readouterr()
    rc = main(args)
    cap = capsys.readouterr()
    _check_one_line(args[0], rc, cap.out, cap.err, needle)


# --------------------------------------------------------------------------------------------
# Missing optional packages: a subprocess whose imports of the package fail as if not installed
# --------------------------------------------------------------------------------------------

_BLOCKED_RUNNER = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys

    blocked = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from bitlm.cli import main

    results = []
    for argv in json.loads(sys.argv[2]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
        results.append({"rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))
""")

# (id, blocked package, argv, what the line must name)
OPTIONAL_CASES = [
    ("export-gguf", "gguf", "export --model {ck} --format gguf --out {dir}/o.gguf", "bitlm[gguf]"),
    ("info-gguf-file", "gguf", "info --model {gguf_trunc}", "bitlm[gguf]"),
    ("train-parquet", "pyarrow", "train --preset tiny --max-steps 1 --data {dir}/d.parquet --out {dir}/r", "bitlm[datasets]"),
    ("eval-hf-dataset", "datasets", "eval --model {ck} --data hf:someone/corpus", "bitlm[datasets]"),
    ("experiment-plot", "matplotlib", "experiment compare --quick --out {dir}/ex", "bitlm[plot]"),
    ("serve-fastapi", "fastapi", "serve --model {packed} --port 0", "bitlm[serve]"),
    ("generate-transformers", "transformers", "generate --model {ck} --prompt hi --max-new-tokens 1", None),
]


@pytest.fixture(scope="module")
def optional_results(files):
    Path(files["dir"], "d.parquet").write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    blocked = sorted({c[1] for c in OPTIONAL_CASES})
    argvs = [shlex.split(c[2].format(**files)) for c in OPTIONAL_CASES]
    r = subprocess.run([sys.executable, "-c", _BLOCKED_RUNNER, ",".join(blocked), json.dumps(argvs)],
                       capture_output=True, text=True, timeout=300, cwd=files["dir"])
    assert r.returncode == 0, r.stderr
    return dict(zip([c[0] for c in OPTIONAL_CASES], json.loads(r.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case_id,package,argv,needle", OPTIONAL_CASES, ids=[c[0] for c in OPTIONAL_CASES])
def test_missing_optional_package_is_one_line(case_id, package, argv, needle, optional_results):
    res = optional_results[case_id]
    verb = argv.split()[0]
    if needle is None:  # a verb that never needs the package works without it
        assert res["rc"] == 0, res["err"]
        assert "Traceback" not in res["err"]
        return
    _check_one_line(verb, res["rc"], res["out"], res["err"], f"'{package}'")
    assert needle in res["err"], res["err"]


# --------------------------------------------------------------------------------------------
# Bugs in bitlm itself: one line that says so (exit 1), the traceback with BITLM_DEBUG=1
# --------------------------------------------------------------------------------------------


def _broken_run(args):
    raise KeyError("layers.0.weight")


def test_internal_error_is_one_line_and_exit_1(monkeypatch, capsys):
    import bitlm.info

    monkeypatch.setattr(bitlm.info, "run", _broken_run)
    monkeypatch.delenv("BITLM_DEBUG", raising=False)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "bitlm info: internal error: KeyError: 'layers.0.weight' (set BITLM_DEBUG=1 for the traceback; please report it)"]
    monkeypatch.setenv("BITLM_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info"])


def test_unknown_module_not_found_is_an_internal_error(monkeypatch, capsys):
    """A missing module that is not an optional package is bitlm's bug, not the user's."""
    import bitlm.info

    def run(args):
        raise ModuleNotFoundError("No module named 'bitlm.nosuch'", name="bitlm.nosuch")

    monkeypatch.setattr(bitlm.info, "run", run)
    monkeypatch.delenv("BITLM_DEBUG", raising=False)
    assert main(["info"]) == 1
    assert "internal error: ModuleNotFoundError" in capsys.readouterr().err


def test_argparse_errors_keep_usage_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pack", "--model", "x"])  # --out missing
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: bitlm pack") and "--out" in err


@pytest.mark.parametrize("exc,expected", [
    (ModuleNotFoundError("No module named 'gguf.constants'", name="gguf.constants"), "pip install 'bitlm[gguf]'"),
    (ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval"), "pip install 'bitlm[eval]'"),
    (ModuleNotFoundError("No module named 'safetensors'", name="safetensors"), "dependency 'safetensors'"),
    (ModuleNotFoundError("No module named 'bitlm.x'", name="bitlm.x"), None),
    (ImportError("cannot import name 'foo' from 'gguf'", name="gguf"), None),  # installed, but not what we need
])
def test_missing_package_message(exc, expected):
    from bitlm.cli import missing_package_message

    msg = missing_package_message(exc)
    assert msg == expected if expected is None else expected in msg


def test_interrupt_exit_status_follows_the_signal(monkeypatch, capsys):
    """A SIGTERM turned into KeyboardInterrupt by training (demo / experiment call train()) exits
    143, not Ctrl-C's 130."""
    import sys
    import types

    from bitlm import cli

    class Stopped(KeyboardInterrupt):
        signum = 15

    fake = types.ModuleType("bitlm_fake_verb")
    fake.add_arguments = lambda p: None

    def run(args):
        raise Stopped("SIGTERM at step 3")

    fake.run = run
    monkeypatch.setitem(sys.modules, "bitlm_fake_verb", fake)
    monkeypatch.setitem(cli.VERBS, "demo", ("bitlm_fake_verb", "fake"))
    assert cli.main(["demo"]) == 143
    fake.run = lambda args: (_ for _ in ()).throw(KeyboardInterrupt())
    assert cli.main(["demo"]) == 130
    err = capsys.readouterr().err
    assert "bitlm demo: interrupted: SIGTERM at step 3" in err and "Traceback" not in err


def test_warnings_are_one_line_naming_the_verb():
    """A warning of a verb (e.g. an HF folder without quantization_config, an untied GGUF) prints as
    one line ``bitlm VERB: warning: ...``, not Python's ``file:line: UserWarning`` plus a line of
    bitlm's source code; the formatter is the verb's only, and Python's comes back afterwards."""
    code = textwrap.dedent("""
        import sys, types, warnings
        from bitlm import cli

        fake = types.ModuleType("bitlm_fake_verb")
        fake.add_arguments = lambda p: None

        def run(args):
            warnings.warn("the folder has no quantization_config: loading it unquantised")
            return 0

        fake.run = run
        sys.modules["bitlm_fake_verb"] = fake
        cli.VERBS["info"] = ("bitlm_fake_verb", "fake")
        rc = cli.main(["info"])
        warnings.warn("after the verb")
        sys.exit(rc)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "bitlm info: warning: the folder has no quantization_config: loading it unquantised", r.stderr
    assert "UserWarning: after the verb" in lines[1], r.stderr  # Python's own format outside the verb
