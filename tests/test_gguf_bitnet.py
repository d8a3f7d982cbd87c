"""GGUF files of the BitNet runtimes: bitnet.cpp's I2_S in ``bitnet-b1.58`` / ``bitnet-25`` and
ik_llama.cpp's IQ2_BN / IQ2_BN_R4 / IQ1_BN — read, written, round-tripped, and refused with
errors that name the tensor.

"Exact" has the meaning of tests/test_gguf.py: the loaded model holds the stored T and the
float32 scale s in FrozenTernaryLinear modules, so its logits equal those of the source with
its projections frozen the same way, bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from bitlm.io import gguf_types as GT
from bitlm.io.gguf import GGUFFormatError, load_gguf, read_gguf, save_gguf, tensor_name_map
from bitlm.io.hf import PROJECTIONS
from test_gguf import frozen_reference, ids, logits, tiny

gguf = pytest.importorskip("gguf")
QT = gguf.GGMLQuantizationType
BN_TYPES = ("i2_s", "iq2_bn", "iq2_bn_r4", "iq1_bn")


def write_gguf(path: Path, arch: str, keys: dict, tensors: list[tuple[str, np.ndarray, tuple | None, int | None]]) -> Path:
    """A GGUF written with the gguf package alone, as another tool would: ``tensors`` are
    (name, array, numpy shape or None, ggml type id or None); raw BitNet types go in as bytes."""
    w = gguf.GGUFWriter(str(path), arch)
    V = gguf.GGUFValueType
    for k, v in keys.items():
        if isinstance(v, bool):
            w.add_key_value(k, v, V.BOOL)
        elif isinstance(v, int):
            w.add_key_value(k, v, V.UINT32)
        elif isinstance(v, float):
            w.add_key_value(k, v, V.FLOAT32)
        elif isinstance(v, str):
            w.add_key_value(k, v, V.STRING)
        elif isinstance(v, list) and v and isinstance(v[0], str):
            w.add_key_value(k, v, V.ARRAY, V.STRING)
        else:
            w.add_key_value(k, list(v), V.ARRAY, V.INT32)
    for name, arr, shape, type_id in tensors:
        if type_id is None:
            w.add_tensor(name, arr)
        elif type_id in GT.TYPE_NAMES:
            w.add_tensor(name, arr.view(np.int8), raw_shape=shape, raw_dtype=type_id)
        else:
            w.add_tensor(name, arr, raw_dtype=QT(type_id))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def microsoft_style(model, path: Path, arch: str = "bitnet-b1.58", type_id: int = GT.I2_S,
                    override: dict | None = None, keys: dict | None = None) -> Path:
    """``model`` laid out as Microsoft's ggml-model-i2_s.gguf: its key set (no activation key, no
    bitlm keys, file_type 40, add_bos_token), an F16 tied embedding, F32 norms, I2_S projections."""
    cfg = model.config
    kv = {f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": cfg.max_seq_len,
          f"{arch}.embedding_length": cfg.d_model, f"{arch}.block_count": cfg.n_layers,
          f"{arch}.feed_forward_length": cfg.ffn_dim, f"{arch}.rope.dimension_count": cfg.head_dim,
          f"{arch}.attention.head_count": cfg.n_heads, f"{arch}.attention.head_count_kv": cfg.kv_heads,
          "tokenizer.ggml.add_bos_token": True, f"{arch}.attention.layer_norm_rms_epsilon": cfg.norm_eps,
          f"{arch}.rope.freq_base": cfg.rope_theta, "general.file_type": 40, "general.quantization_version": 2,
          **(keys or {})}
    sd = model.state_dict()
    tensors = []
    for ours, theirs in tensor_name_map(cfg).items():
        base = ours.removesuffix(".weight")
        if theirs in (override or {}):
            tensors.append((theirs, *override[theirs]))
        elif base.endswith(tuple(PROJECTIONS)):
            t, s = model.get_submodule(base).quantized_weight()
            tn = t.numpy().astype(np.int8)
            tensors.append((theirs, GT.encode(type_id, tn, s.numpy().reshape(-1)[0]), tn.shape, type_id))
        elif sd[ours].ndim == 1:
            tensors.append((theirs, sd[ours].float().numpy(), None, None))
        else:
            tensors.append((theirs, sd[ours].float().numpy().astype(np.float16), None, None))
    return write_gguf(path, arch, kv, tensors)


# ---------------------------------------------------------------------------------------------
# reading files as the runtimes' own tools write them
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bitnet-b1.58", "bitnet-25"])
def test_microsoft_i2s_file_loads_exactly(tmp_path, arch):
    m = tiny(arch="bitnet-2b4t")
    path = microsoft_style(m, tmp_path / "ms.gguf", arch)
    loaded = load_gguf(path)
    assert loaded.config.arch == "bitnet-2b4t" and loaded.config.tie_embeddings
    x = ids()
    assert torch.equal(logits(loaded, x), logits(frozen_reference(m, f16_head=True), x))
    with read_gguf(path) as f:
        assert f.tensors["blk.0.attn_q.weight"].type_name == "I2_S"
        assert f.tensors["blk.0.attn_q.weight"].nbytes == 256 * 256 // 4 + 32
        assert f.raw("blk.0.attn_q.weight").shape == (256 * 256 // 4 + 32,)  # the tail splits into no rows


@pytest.mark.parametrize("type_id", [GT.IQ2_BN, GT.IQ2_BN_R4, GT.IQ1_BN])
def test_ik_llama_files_load_exactly(tmp_path, type_id):
    m = tiny(arch="bitnet-2b4t")
    path = microsoft_style(m, tmp_path / "ik.gguf", "bitnet-25", type_id)
    x = ids()
    ref = frozen_reference(m, f16_scales=type_id == GT.IQ1_BN, f16_head=True)
    assert torch.equal(logits(load_gguf(path), x), logits(ref, x))


def llama3_vocab_keys(tmp_path: Path) -> tuple[object, dict]:
    """(tokenizer, the tokenizer.ggml.* keys of Microsoft's file for it): a LLaMA 3-style BPE
    vocabulary without tokenizer.ggml.pre, as in ggml-model-i2_s.gguf."""
    from test_gguf import llama3_style_tokenizer

    tok = llama3_style_tokenizer()
    ref = save_gguf(tiny(), tmp_path / "ref.gguf", tokenizer=tok)
    with read_gguf(ref) as f:
        meta = {k: f.metadata[k] for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges")}
        meta["tokenizer.ggml.token_type"] = f.metadata["tokenizer.ggml.token_type"].tolist()
        meta["tokenizer.ggml.bos_token_id"] = f.metadata["tokenizer.ggml.bos_token_id"]
        meta["tokenizer.ggml.eos_token_id"] = f.metadata["tokenizer.ggml.eos_token_id"]
    return tok, meta


def test_llama3_vocabulary_without_pre_key_gets_llama3_split(tmp_path):
    """Microsoft's file names no tokenizer.ggml.pre; a LLaMA 3 vocabulary must still split as LLaMA 3."""
    tok, meta = llama3_vocab_keys(tmp_path)
    path = microsoft_style(tiny(arch="bitnet-2b4t"), tmp_path / "ms.gguf", keys=meta)
    rebuilt = load_gguf(path).tokenizer
    assert rebuilt.add_bos  # the file's add_bos_token = true
    for s in ["numbers 1234567 split in threes", "it's they'll", "x\n\n\ny"]:
        assert rebuilt.encode(s) == tok.encode(s), s


def test_cli_eval_and_generate_run_a_microsoft_file(tmp_path, capsys):
    """bitlm eval / generate on a file laid out as Microsoft's (I2_S, F16 tied embedding, LLaMA 3
    vocabulary in the file, no sidecar tokenizer): the numbers and text of the checkpoint it
    holds, computed with bitlm's own tokenizer rebuilt from the GGUF vocabulary."""
    import json

    from bitlm.cli import main
    from bitlm.evaluate import perplexity
    from bitlm.generate import generate
    from bitlm.io.gguf import gguf_tokenizer
    from bitlm.tasks import encode_text

    m = tiny(arch="bitnet-2b4t")
    _, meta = llama3_vocab_keys(tmp_path)
    path = microsoft_style(m, tmp_path / "ggml-model-i2_s.gguf", keys=meta)
    ref, tok = frozen_reference(m, f16_head=True), gguf_tokenizer(path)
    text = "it's the numbers 1234567 that they'll split in threes, x\n\ny " * 3
    assert main(["eval", "--model", str(path), "--text", text, "--json", str(tmp_path / "e.json")]) == 0
    got = json.loads((tmp_path / "e.json").read_text())["lm"]
    ids_ = encode_text(tok, text)
    assert ids_[0] == tok.bos_id  # the file's add_bos_token = true
    want = perplexity(ref, ids_)
    assert got["loss"] == want["loss"] and got["tokens"] == want["tokens"] == len(ids_) - 1
    capsys.readouterr()
    prompt = "numbers 12 and"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "8", "--no-stream"]) == 0
    out = capsys.readouterr().out
    completion = generate(ref, tok, prompt, 8)
    assert completion and out == prompt + completion + "\n"


def test_q6_k_and_q8_0_heads_are_read(tmp_path):
    m = tiny(arch="bitnet-2b4t")
    emb = m.model.embed_tokens.weight.detach().numpy()
    q8 = gguf.quants.quantize(emb, QT.Q8_0)
    rng = np.random.default_rng(0)
    q6 = rng.integers(0, 256, (emb.shape[0], emb.shape[1] // 256 * 210), dtype=np.uint8)
    q6.reshape(-1, 210)[:, -2:] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)  # finite block scales d
    for qt, raw in ((QT.Q8_0, q8), (QT.Q6_K, q6)):
        path = microsoft_style(m, tmp_path / f"{qt.name}.gguf", override={"token_embd.weight": (raw, None, int(qt))})
        got = load_gguf(path).model.embed_tokens.weight.detach().numpy()
        assert np.array_equal(got, gguf.quants.dequantize(raw, qt).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# writing: bitlm → GGUF → bitlm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttype", BN_TYPES)
@pytest.mark.parametrize("arch", ["bitnet-2b4t", "bitnet-b1.58"])
def test_round_trip_is_exact(tmp_path, arch, ttype):
    m = tiny(arch=arch)
    path = save_gguf(m, tmp_path / "m.gguf", ternary_type=ttype, head_type="f32")
    loaded = load_gguf(path)
    x = ids()
    # IQ1_BN's row scale is f16 in the file; bitlm.ternary_scales brings back the exact float32 s
    assert torch.equal(logits(loaded, x), logits(frozen_reference(m), x))
    assert save_gguf(loaded, tmp_path / "again.gguf", ternary_type=ttype, head_type="f32").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("ttype,arch,file_type", [("i2_s", "bitnet-b1.58", 40), ("iq2_bn", "bitnet-25", 137),
                                                  ("iq2_bn_r4", "bitnet-25", 337), ("iq1_bn", "bitnet-25", 136)])
def test_architecture_keys_and_types(tmp_path, ttype, arch, file_type):
    path = save_gguf(tiny(arch="bitnet-2b4t"), tmp_path / "m.gguf", ternary_type=ttype)
    with read_gguf(path) as f:
        meta = f.metadata
        assert meta["general.architecture"] == arch and meta["general.file_type"] == file_type
        assert meta[f"{arch}.hidden_activation"] == "relu2" and "bitnet.feed_forward_activation" not in meta
        assert meta[f"{arch}.embedding_length"] == 256 and meta[f"{arch}.rope.dimension_count"] == 64
        assert "output.weight" not in f.tensors
        assert {f.tensors[f"blk.1.{p}.weight"].type_name for p in ("attn_q", "ffn_down")} == {ttype.upper()}
    silu = save_gguf(tiny(arch="bitnet-b1.58"), tmp_path / "silu.gguf", ternary_type=ttype)
    with read_gguf(silu) as f:  # the runtimes' SiLU graph is the one of llama.cpp's 'bitnet'
        assert f.metadata["general.architecture"] == "bitnet" and f.metadata["bitnet.hidden_activation"] == "silu"


def test_export_cli_i2s_gives_the_checkpoints_logits(tmp_path):
    from bitlm.cli import main
    from bitlm.io.checkpoint import save_checkpoint
    from bitlm.loading import load

    m = tiny(arch="bitnet-2b4t", tied=False)
    save_checkpoint(m, tmp_path / "ckpt")
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gguf", "--gguf-type", "i2_s",
                 "--head-type", "f32", "--out", str(out)]) == 0
    x = ids()
    ckpt = frozen_reference(load(tmp_path / "ckpt"))
    assert torch.equal(logits(load(out), x), logits(ckpt, x))
    with read_gguf(out) as f:  # untied heads are part of the ReLU² runtimes' graph
        assert f.metadata["general.architecture"] == "bitnet-b1.58" and "output.weight" in f.tensors


def test_rows_that_do_not_fit_fall_back_to_exact_f16(tmp_path):
    m = tiny(arch="bitnet-2b4t", d=192, d_ff=320)  # 192 % 128 ≠ 0; 320 % 64 = 0, 320 % 128 ≠ 0
    with pytest.warns(UserWarning, match=r"do not fit I2_S \(rows not a multiple of 128\)"):
        path = save_gguf(m, tmp_path / "m.gguf", ternary_type="i2_s", head_type="f32")
    with read_gguf(path) as f:
        assert f.tensors["blk.0.attn_q.weight"].type_name == "F16"
    x = ids()
    assert torch.equal(logits(load_gguf(path), x), logits(frozen_reference(m), x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_gguf(m, tmp_path / "bn.gguf", ternary_type="iq2_bn")  # 192 and 320 are whole IQ2_BN blocks


def test_grouped_weight_scales_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"q_proj: 2 weight scale groups; GGUF I2_S .* one scale per tensor"):
        save_gguf(tiny(arch="bitnet-2b4t", weight_groups=2), tmp_path / "g.gguf", ternary_type="i2_s")


# ---------------------------------------------------------------------------------------------
# refusals that name the tensor
# ---------------------------------------------------------------------------------------------


def test_unused_code_3_is_refused_naming_the_tensor(tmp_path):
    m = tiny(arch="bitnet-2b4t")
    t, s = m.model.layers[1].mlp.up_proj.quantized_weight()
    raw = GT.encode(GT.I2_S, t.numpy(), s.numpy()[0])
    raw[7] |= 0b11
    path = microsoft_style(m, tmp_path / "bad.gguf", override={"blk.1.ffn_up.weight": (raw, tuple(t.shape), GT.I2_S)})
    with pytest.raises(GGUFFormatError, match=r"tensor 'blk.1.ffn_up.weight' \(I2_S\) holds the unused code 0b11"):
        load_gguf(path)


def test_i2s_of_the_wrong_byte_size_is_refused(tmp_path):
    m = tiny(arch="bitnet-2b4t")
    t, s = m.model.layers[0].self_attn.k_proj.quantized_weight()
    short = GT.encode(GT.I2_S, t.numpy(), s.numpy()[0])[:-32]  # no tail: as a writer with another size would
    path = microsoft_style(m, tmp_path / "short.gguf", override={"blk.0.attn_k.weight": (short, tuple(t.shape), GT.I2_S)})
    with pytest.raises(GGUFFormatError, match=r"tensor 'blk.0.attn_k.weight' \(I2_S, dims \[256, 128\]\) has 8192 "
                                              r"bytes before the next tensor; its type needs 8224"):
        read_gguf(path)


def test_i2s_rows_of_the_arm_block_size_are_refused(tmp_path):
    m = tiny(arch="bitnet-2b4t")
    raw = np.zeros(64 * 64 // 4 + 32, np.uint8)
    path = microsoft_style(m, tmp_path / "arm.gguf", override={"blk.0.attn_q.weight": (raw, (64, 64), GT.I2_S)})
    with pytest.raises(GGUFFormatError, match=r"tensor 'blk.0.attn_q.weight' \(I2_S\) has rows of 64 weights"):
        read_gguf(path)


def test_truncated_i2s_tensor(tmp_path):
    path = save_gguf(tiny(arch="bitnet-2b4t"), tmp_path / "m.gguf", ternary_type="i2_s")
    with read_gguf(path) as f:
        last = max(f.tensors.values(), key=lambda i: i.offset)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: last.offset + last.nbytes - 1])
    with pytest.raises(GGUFFormatError, match=f"tensor '{last.name}' is truncated"):
        read_gguf(cut)


def test_unknown_type_and_architecture(tmp_path):
    m = tiny(arch="bitnet-2b4t")
    path = microsoft_style(m, tmp_path / "odd.gguf", arch="bitnet-99")
    with pytest.raises(GGUFFormatError, match="architecture 'bitnet-99'.* is not supported"):
        load_gguf(path)
    with pytest.raises(ValueError):
        QT(37)  # an id neither the gguf package nor the BitNet runtimes define
    f32 = np.zeros((128, 256), np.float32)
    odd = microsoft_style(m, tmp_path / "type.gguf", override={"blk.0.attn_v.weight": (f32, None, None)})
    # rewrite the type id of attn_v in place: find its tensor-info record and patch the type field
    data = bytearray(odd.read_bytes())
    key = b"blk.0.attn_v.weight"
    at = data.index(key) + len(key) + 4 + 2 * 8  # name, n_dims, two dims
    assert int.from_bytes(data[at:at + 4], "little") == 0  # was F32
    data[at:at + 4] = (37).to_bytes(4, "little")
    odd.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="tensor 'blk.0.attn_v.weight' has unknown ggml type 37"):
        read_gguf(odd)


def test_relu2_architecture_refuses_a_silu_claim(tmp_path):
    path = microsoft_style(tiny(arch="bitnet-2b4t"), tmp_path / "m.gguf", keys={"bitnet-b1.58.hidden_activation": "silu"})
    with pytest.raises(GGUFFormatError, match="graph of bitnet.cpp and ik_llama.cpp is ReLU²"):
        load_gguf(path)
    ok = microsoft_style(tiny(arch="bitnet-2b4t"), tmp_path / "ok.gguf")
    with pytest.raises(GGUFFormatError, match="activation='silu'"):
        load_gguf(ok, activation="silu")


def test_per_row_scales_are_refused_unless_allowed(tmp_path):
    """What llama-quantize makes of float weights: IQ2_BN rows with their own max-based scale."""
    m = tiny(arch="bitnet-2b4t")
    t, s = m.model.layers[0].mlp.gate_proj.quantized_weight()
    d = np.linspace(0.5, 1.5, t.shape[0], dtype=np.float32) * s.numpy()[0]
    raw = GT.encode(GT.IQ2_BN, t.numpy(), d)
    path = microsoft_style(m, tmp_path / "rows.gguf", "bitnet-25", GT.IQ2_BN,
                           override={"blk.0.ffn_gate.weight": (raw, tuple(t.shape), GT.IQ2_BN)})
    with pytest.raises(GGUFFormatError, match=r"'blk.0.ffn_gate.weight' is not a per-tensor-scale ternary weight: "
                                              r"its IQ2_BN rows have 512 different scales"):
        load_gguf(path)
    with pytest.warns(UserWarning, match="not one-scale ternary"):
        loaded = load_gguf(path, allow_non_ternary=True)
    w = loaded.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    assert np.array_equal(w, t.numpy() * d[:, None])


def test_pack_reads_an_i2s_file(tmp_path):
    from bitlm.cli import main
    from bitlm.loading import load

    m = tiny(arch="bitnet-2b4t")
    path = save_gguf(m, tmp_path / "m.gguf", ternary_type="i2_s", head_type="f32")
    out = tmp_path / "m.bitlm"
    assert main(["pack", "--model", str(path), "--out", str(out)]) == 0
    x = ids(b=1, t=8)
    ref = logits(load_gguf(path), x)
    pm = load(out)
    pm.kv = "f32"  # as the torch model's cache (the engine's default f16 KV: tests/test_kv.py)
    got = logits(pm, x)  # the native engine: same T and s, its own int8 kernels
    assert got.shape == ref.shape and float((got - ref).norm() / ref.norm()) < 1e-3


@pytest.mark.parametrize("verb", ["generate", "eval", "pack"])
def test_cli_reports_a_bad_tensor_in_one_line(tmp_path, capsys, verb):
    from bitlm.cli import main

    m = tiny(arch="bitnet-2b4t")
    t, s = m.model.layers[0].self_attn.o_proj.quantized_weight()
    raw = GT.encode(GT.I2_S, t.numpy(), s.numpy()[0])
    raw[100] = 0xFF
    path = microsoft_style(m, tmp_path / "bad.gguf", override={"blk.0.attn_output.weight": (raw, tuple(t.shape), GT.I2_S)})
    extra = {"generate": ["--prompt", "x"], "eval": ["--data", str(tmp_path / "none.txt")],
             "pack": ["--out", str(tmp_path / "o.bitlm")]}[verb]
    (tmp_path / "none.txt").write_text("some text " * 50)
    try:
        rc = main([verb, "--model", str(path), *extra])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"bitlm {verb}: error: ") and "'blk.0.attn_output.weight' (I2_S) holds the unused code 0b11" in err[0]
