"""The packed engine: same logits and greedy tokens as the torch reference, the packed file,
bad files, and the pack / generate / chat commands."""

import json
import subprocess
import sys

import pytest
import torch

from bitlm.cli import main
from bitlm.config import preset
from bitlm.engine import PackedFormatError, convert, load_packed, save_packed
from bitlm.generate import generate_tokens
from bitlm.io.checkpoint import save_checkpoint
from bitlm.loading import load
from bitlm.model import BitNetModel
from helpers import tiny_model


def sharpened(name, **kw):
    """A random model with larger weights so that logits are well separated (no greedy ties)."""
    return tiny_model(name, sharpen=50, max_seq_len=96, **kw)


CASES = [("tiny", "i2"), ("tiny", "t1"), ("tiny-2b4t", "i2"), ("tiny-2b4t", "t1"), ("tiny-bitnet", "b1")]


@pytest.mark.parametrize("name,fmt", CASES)
def test_packed_logits_match_reference(name, fmt):
    m = sharpened(name)
    pm = convert(m, fmt)
    pm.kv = "f32"  # the torch model's own attention reads float32 keys / values (f16: tests/test_kv.py)
    ids = torch.randint(0, m.config.vocab_size, (3, 24))
    with torch.no_grad():
        ref = m(ids)
    out = pm(ids)
    # identical integer math; only the order of float ops around it differs, which can move an
    # activation across an int8 rounding boundary now and then (one code step, then propagated)
    err = (out - ref).abs() / ref.abs().max()
    assert (err < 1e-5).float().mean() > 0.9, err.max()
    assert err.max() < 0.02


@pytest.mark.parametrize("name,fmt", CASES)
def test_packed_greedy_equals_reference_64_tokens(name, fmt):
    m = sharpened(name)
    pm = convert(m, fmt)
    prompt = [3, 14, 15, 92, 65]
    ref = list(generate_tokens(m, prompt, 64))
    out = list(generate_tokens(pm, prompt, 64))
    assert len(ref) == 64 and out == ref


def test_converted_variants_sub_norm_and_bias():
    m = sharpened("tiny", sub_norm=False, qkv_bias=True)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    pm = convert(m)
    pm.kv = "f32"
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.allclose(pm(ids), m(ids), atol=1e-4 * m(ids).abs().max().item())


def test_low_precision_heads_are_close():
    m = sharpened("tiny-2b4t")
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        ref = m(ids)
    for head in ("bf16", "int8"):
        out = convert(m, head=head)(ids)
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 0.02, (head, rel)


@pytest.mark.parametrize("name", ["tiny-2b4t", "tiny-bitnet"])
def test_w8a8_head_is_its_twin_and_close_to_the_float_head(name, monkeypatch):
    """head_act='int8': the final norm fused with the per-token quantiser, then the exact
    int8 x int8 head.  Its logits are what the torch twin computes from the same hidden state,
    close to the float-activation int8 head's, and greedy decoding agrees with it."""
    from bitlm import kernels
    from bitlm.kernels import reference as R

    m = sharpened(name)
    pm = convert(m, head="int8")
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    f32 = pm(ids)
    pm.head_act = "int8"
    a8 = pm(ids)
    rel = ((a8 - f32).norm() / f32.norm()).item()
    assert 0 < rel < 0.02, rel  # really a different path, and only activation rounding apart
    # the twin: the hidden state before the final norm, through the reference ops
    seen = {}
    real_final = pm._final

    def spy(x, B, T):
        seen["x"] = x.clone()
        return real_final(x, B, T)

    monkeypatch.setattr(pm, "_final", spy)
    assert torch.equal(pm(ids), a8)
    x = seen["x"]
    cfg = pm.config
    if cfg.arch == "bitnet":
        xq, a = R.quantize_rows(torch.nn.functional.layer_norm(x, (cfg.d_model,), pm.final_norm, pm.final_norm_b,
                                                               cfg.norm_eps))
    else:
        xq, a = R.quantize_rows(x, pm.final_norm, cfg.norm_eps)
    want = R.dense_int8a8_matmul(xq, a, pm.head.weight, pm.head.scale).view(2, 16, -1)
    assert torch.equal(a8, want) if kernels.backend() == "native" else torch.allclose(a8, want)
    prompt = [3, 14, 15, 92, 65]
    pm.head_act = "f32"
    ref = list(generate_tokens(pm, prompt, 32))
    pm.head_act = "int8"
    assert list(generate_tokens(pm, prompt, 32)) == ref


def test_w8a8_head_needs_an_int8_head():
    pm = convert(sharpened("tiny"), head="bf16")
    with pytest.raises(ValueError, match="needs an int8 output head"):
        pm.head_act = "int8"
    with pytest.raises(ValueError, match="head_act must be one of"):
        pm.head_act = "int4"
    assert pm.head_act == "f32"


def test_packed_file_round_trip_and_bits(tmp_path):
    m = sharpened("tiny-2b4t", d_model=160, d_ff=320)  # N, K multiples of the tile (16) and chunks (16, 20)
    ids = torch.randint(0, 512, (2, 10))
    for fmt, bpw in (("i2", 2.0), ("t1", 1.6)):
        pm = convert(m, fmt)
        path = save_packed(pm, tmp_path / f"m-{fmt}.bitlm")
        pm2 = load_packed(path)
        assert torch.equal(pm2(ids), pm(ids))
        assert load(path).format == fmt  # bitlm.load dispatches on the magic
        lin = sum(w.N * w.K for L in pm2.layers for w in (L.q, L.k, L.v, L.o, L.up, L.down))
        assert 8 * pm2.weight_bytes()["linear"] / lin == pytest.approx(bpw)  # no padding at these shapes


def test_fp_model_cannot_be_packed():
    with pytest.raises(ValueError, match="fp"):
        convert(BitNetModel(preset("tiny", quant="fp")))
    with pytest.raises(ValueError, match="ternary"):
        convert(BitNetModel(preset("tiny")), "b1")


def test_bad_packed_files(tmp_path):
    pm = convert(sharpened("tiny"))
    path = save_packed(pm, tmp_path / "m.bitlm")
    data = bytearray(path.read_bytes())
    (tmp_path / "trunc.bitlm").write_bytes(data[: len(data) - 1000])
    with pytest.raises(PackedFormatError, match="truncated.*tensor"):
        load_packed(tmp_path / "trunc.bitlm")
    bad = bytearray(data)
    bad[-3000] ^= 0xFF
    (tmp_path / "corrupt.bitlm").write_bytes(bad)
    with pytest.raises(PackedFormatError, match="corrupt"):
        load_packed(tmp_path / "corrupt.bitlm")
    ver = bytearray(data)
    ver[8] = 99
    (tmp_path / "ver.bitlm").write_bytes(ver)
    with pytest.raises(PackedFormatError, match="version 99"):
        load_packed(tmp_path / "ver.bitlm")
    (tmp_path / "junk.bitlm").write_bytes(b"BITLMPAK" + b"\0" * 4)
    with pytest.raises(PackedFormatError):
        load_packed(tmp_path / "junk.bitlm")


def test_pack_generate_chat_cli(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, trainers

    from bitlm.data import Tokenizer

    backend = HFTok(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["the cat sat on the mat. " * 50], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = Tokenizer(backend)
    m = sharpened("tiny", vocab_size=512)
    ck = save_checkpoint(m, tmp_path / "ck", tokenizer=tok)
    assert main(["pack", "--model", str(ck), "--out", str(tmp_path / "m.bitlm"), "--format", "t1"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m.bitlm"), "--prompt", "the cat", "--max-new-tokens", "8"]) == 0
    packed_text = capsys.readouterr().out
    assert main(["generate", "--model", str(ck), "--prompt", "the cat", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == packed_text  # same greedy text from both engines
    # the W8A8 head: int8-head packs only, a one-line error otherwise
    assert main(["pack", "--model", str(ck), "--out", str(tmp_path / "m8.bitlm"), "--head", "int8"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "m8.bitlm"), "--prompt", "the cat", "--max-new-tokens", "8",
                 "--head-act", "int8"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    ppl = {}
    for act in ("f32", "int8"):
        assert main(["eval", "--model", str(tmp_path / "m8.bitlm"), "--text", "the cat sat on the mat. " * 8,
                     "--head-act", act, "--json", str(tmp_path / f"e-{act}.json")]) == 0
        ppl[act] = json.loads((tmp_path / f"e-{act}.json").read_text())["lm"]["ppl"]
    assert ppl["int8"] != ppl["f32"] and abs(ppl["int8"] / ppl["f32"] - 1) < 0.05, ppl  # the W8A8 head ran
    for bad in (str(tmp_path / "m.bitlm"), str(ck)):
        r = subprocess.run([sys.executable, "-m", "bitlm.cli", "generate", "--model", bad, "--prompt", "the cat",
                            "--max-new-tokens", "2", "--head-act", "int8"], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and ("--head-act" in r.stderr or "int8 output head" in r.stderr), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "bitlm.cli", "chat", "--model", str(tmp_path / "m.bitlm"),
                        "--max-new-tokens", "5"], input="hello\nthe cat\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # each reply is what generate gives for the same prompt (template "plain", history included), greedy
    from bitlm.generate import CHAT_TEMPLATES, chat_prompt, chat_prompt_ids, generate
    from bitlm.loading import load_tokenizer_for

    pm, tok = load(tmp_path / "m.bitlm"), load_tokenizer_for(tmp_path / "m.bitlm")
    stop = CHAT_TEMPLATES["plain"]["stop"]
    msgs = [("User", "hello")]
    want1 = generate(pm, tok, chat_prompt_ids(tok, msgs, "plain"), 5, stop=stop)
    msgs += [("Assistant", want1.strip()), ("User", "the cat")]
    want2 = generate(pm, tok, chat_prompt_ids(tok, msgs, "plain"), 5, stop=stop)
    assert want2 == generate(pm, tok, chat_prompt(msgs, "plain"), 5, stop=stop)  # bitlm tokenizer: same ids
    assert want1.strip() and r.stdout == f"{want1}\n{want2}\n"


def test_public_pack_api():
    import bitlm

    m = sharpened("tiny")
    pm = bitlm.pack(m, format="t1")
    assert pm.format == "t1" and pm.layers[0].q.format == "t1"
    w = bitlm.pack(torch.randn(32, 40))
    assert w.format == "i2" and w.unpack().abs().max() <= 1


def test_info_describes_checkpoint_and_packed_model(tmp_path, capsys):
    import json

    m = sharpened("tiny")
    ck = save_checkpoint(m, tmp_path / "ck")
    path = save_packed(convert(m, "i2"), tmp_path / "m.bitlm")
    assert main(["info", "--model", str(ck), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["linear_parameters"] == sum(p.numel() for n, p in m.named_parameters() if n.endswith("_proj.weight"))
    assert info["environment"]["kernels"]["backend"] in ("native", "reference")
    assert main(["info", "--model", str(path), "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)["model"]
    assert packed["packed_format"] == "i2"
    assert packed["bits_per_linear_weight"] == 2.0  # tiny's shapes are whole 16x16 tiles: no padding


def test_last_only_logits_equal_the_last_position():
    m = sharpened("tiny-2b4t")
    pm = convert(m)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():  # a (B, d) x (d, V) matmul need not round like a (B*T, d) one: allclose
        assert torch.allclose(m(ids, last_only=True), m(ids)[:, -1:], atol=1e-5)
    assert torch.allclose(pm(ids, last_only=True), pm(ids)[:, -1:], atol=1e-5)


@pytest.mark.parametrize("norm", [None, "rmsnorm"])
@pytest.mark.parametrize("fmt", ["i2", "t1"])
def test_packed_bitlinear_equals_bitlinear(norm, fmt):
    from bitlm.engine import PackedBitLinear
    from bitlm.layers import BitLinear

    torch.manual_seed(0)
    lin = BitLinear(96, 48, norm=norm, weight_groups=2)
    x = torch.randn(5, 96) * 3
    with torch.no_grad():
        ref = lin(x)
    out = PackedBitLinear.from_bitlinear(lin, fmt)(x)
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max().item())


def test_bitlm_pack_shows_progress_per_layer(tmp_path, capsys, monkeypatch):
    """Packing a large model takes a minute (a 2B4T shape: 30 layers of ~2 s each): ``bitlm pack``
    reports progress per layer through ``bitlm.data.common.progress`` (issue 16: every long task),
    and ``bitlm.pack`` / ``convert`` stay quiet by default."""
    m = sharpened("tiny")
    ck = save_checkpoint(m, tmp_path / "ck")
    monkeypatch.setenv("BITLM_PROGRESS", "bar")  # as on a terminal
    capsys.readouterr()
    convert(m)
    assert capsys.readouterr().err == ""
    assert main(["pack", "--model", str(ck), "--out", str(tmp_path / "m.bitlm")]) == 0
    err = capsys.readouterr().err
    assert "pack:" in err and f"/{m.config.n_layers} " in err and "layer" in err, err
