"""Parity with a real BitNet runtime: ik_llama.cpp runs bitlm's I2_S, IQ2_BN, IQ2_BN_R4 and IQ1_BN exports.

Optional, like the llama.cpp parity tests: set ``BITLM_IK_LLAMA_BIN`` to the folder holding an
ik_llama.cpp build's ``llama-cli``, ``llama-perplexity`` and ``llama-quantize`` (CPU build, see
docs/gguf.md "Running the files in bitnet.cpp and ik_llama.cpp").  A tiny 2B4T-style (ReLU²,
sub-norms, tied head) b1.58 model, and its SiLU-gated twin (ik's ``bitnet`` graph), learns a
text by heart; bitlm exports it as IQ2_BN (ik's own
type, read directly), IQ2_BN_R4 and IQ1_BN (ik's other BitNet types, read directly) and as I2_S
(Microsoft's type: ik_llama.cpp can only dequantise it, so it runs it after
``llama-quantize --allow-requantize ... iq2_bn``).  Each must give bitlm's greedy continuation
and bitlm's perplexity, computed the way ``llama-perplexity`` computes it (chunks of ``n_ctx``
tokens, the second half of each scored), up to the runtime's int8 activation rounding.  And
bitlm reads back, bit for bit, the IQ files ik's own ``llama-quantize`` makes of its I2_S file.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bitlm.config import ModelConfig
from bitlm.io.gguf import load_gguf, read_gguf, save_gguf
from bitlm.model import BitNetModel
from helpers import bitlm_greedy
from test_gguf import frozen_reference

IK_BIN = os.environ.get("BITLM_IK_LLAMA_BIN")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IK_BIN, reason="BITLM_IK_LLAMA_BIN (an ik_llama.cpp build's bin folder) not set"),
]

TEXT = ("A small model learns a fixed text by heart. It reads the words again and again, until every "
        "next token is certain. Then greedy decoding walks the same path in any runtime that computes the "
        "same function: bitlm in torch, ik_llama.cpp in C. The quick brown fox jumps over the lazy dog; pack "
        "my box with five dozen liquor jugs. How vexingly quick daft zebras jump! ")
N_CTX = 64
IK_TYPES = ("iq2_bn", "iq2_bn_r4", "iq1_bn")  # ik_llama.cpp's own types, run as bitlm wrote them
KINDS = (*IK_TYPES, "i2_s")


def _bin(name: str) -> str:
    p = Path(IK_BIN) / name
    assert p.is_file(), f"{p}: not found in BITLM_IK_LLAMA_BIN"
    return str(p)


def _run(*args: str, cwd: Path, timeout: int = 300) -> str:
    """Run an ik_llama.cpp tool in ``cwd`` (llama-cli writes main.log / llama.log there)."""
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
    assert r.returncode == 0, f"{args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def tokenizer():
    from bitlm.data import EOS_TOKEN, PAD_TOKEN, Tokenizer
    from bitlm.data.tokenizer import _train_bpe

    return Tokenizer(_train_bpe([TEXT] * 4, 280), EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)


@pytest.fixture(scope="module", params=["bitnet-2b4t", "bitnet-b1.58"])
def recited(tokenizer, request):
    """A b1.58 model that recites TEXT (rows of 512, as ik's IQ kernels want): 2B4T-style (ReLU²,
    ik's ``bitnet-25`` / ``bitnet-b1.58`` graph) or SiLU-gated (ik's ``bitnet`` graph)."""
    data = torch.tensor(tokenizer.encode(TEXT) * 4)
    torch.manual_seed(0)
    cfg = ModelConfig(arch=request.param, vocab_size=320, d_model=512, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=1024, max_seq_len=256, tie_embeddings=True)
    model = BitNetModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        starts = torch.randint(0, len(data) - N_CTX - 1, (8,), generator=g).tolist()
        x = torch.stack([data[s : s + N_CTX] for s in starts])
        y = torch.stack([data[s + 1 : s + N_CTX + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def bitlm_ppl(model, tokens: list[int]) -> float:
    """llama-perplexity's number: chunks of N_CTX tokens, the tokens after the first half scored."""
    first, nll, count = N_CTX // 2, 0.0, 0
    with torch.no_grad():
        for c in range(len(tokens) // N_CTX):
            chunk = torch.tensor([tokens[c * N_CTX : (c + 1) * N_CTX]])
            logp = torch.log_softmax(model(chunk)[0].double(), dim=-1)  # (T, V)
            for i in range(first, N_CTX - 1):
                nll -= float(logp[i, chunk[0, i + 1]])
                count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def files(recited, tokenizer, tmp_path_factory):
    """gguf type -> the file ik_llama.cpp runs (I2_S requantised by ik's own llama-quantize)."""
    d = tmp_path_factory.mktemp("ik")
    direct = {k: save_gguf(recited, d / f"m-{k}.gguf", ternary_type=k, tokenizer=tokenizer) for k in IK_TYPES}
    i2s = save_gguf(recited, d / "m-i2_s.gguf", ternary_type="i2_s", tokenizer=tokenizer)
    requant = d / "m-i2_s-as-iq2_bn.gguf"
    _run(_bin("llama-quantize"), "--allow-requantize", "--token-embedding-type", "f16", "--output-tensor-type", "f16",
         str(i2s), str(requant), "iq2_bn", cwd=d)  # keep the f16 embedding (tied head) as bitlm wrote it
    return {**direct, "i2_s": requant, "i2s_bitlm": i2s}


@pytest.mark.parametrize("kind", KINDS)
def test_ik_llama_greedy_tokens_equal_bitlm(recited, tokenizer, files, kind, tmp_path):
    prompt_text = TEXT[:40]
    prompt = tokenizer.encode(prompt_text)
    ours, margin = bitlm_greedy(recited, prompt, 16)
    assert margin > 0.5, f"training left near-ties (margin {margin:.3f}): the comparison would be meaningless"
    out = _run(_bin("llama-cli"), "-m", str(files[kind]), "-p", prompt_text, "-n", "16", "--temp", "0",
               "--top-k", "1", "-t", "1", "-c", "256", "--no-warmup", "--simple-io", cwd=tmp_path)
    want = tokenizer.decode(ours)
    assert prompt_text + want in out, f"ik_llama.cpp wrote {out[-600:]!r}, bitlm {want!r}"
    print(f"{recited.config.arch} {kind}: ik_llama.cpp continued with bitlm's {len(ours)} greedy tokens {want!r} (smallest top-1 margin {margin:.2f})")


@pytest.mark.parametrize("kind", KINDS)
def test_ik_llama_perplexity_equals_bitlm(recited, tokenizer, files, kind, tmp_path):
    # the learnt text and the same words in reverse order (not learnt: a perplexity far from 1)
    text = TEXT * 3 + (" ".join(reversed(TEXT.split())) + " ") * 3
    tokens = tokenizer.encode(text)
    assert len(tokens) >= 2 * N_CTX
    (tmp_path / "t.txt").write_text(text)
    out = _run(_bin("llama-perplexity"), "-m", str(files[kind]), "-f", str(tmp_path / "t.txt"), "-c", str(N_CTX),
               "-b", str(N_CTX), "-t", "1", cwd=tmp_path)
    m = re.search(r"Final estimate: PPL over (\d+) chunks for n_ctx=\d+ = ([0-9.]+)", out)
    assert m, out[-2000:]
    assert int(m.group(1)) == len(tokens) // N_CTX  # the same tokens: ik tokenises the text as bitlm does
    theirs, ours = float(m.group(2)), bitlm_ppl(recited, tokens)
    print(f"{recited.config.arch} {kind}: ik_llama.cpp PPL {theirs:.4f}, bitlm {ours:.4f}")  # pytest -rP shows it
    assert abs(math.log(theirs) - math.log(ours)) < 0.005, (theirs, ours)  # measured 18.7704 vs 18.7783: int8 activation rounding


@pytest.mark.parametrize("kind", IK_TYPES)
def test_bitlm_reads_what_ik_llama_quantize_writes(recited, files, kind, tmp_path):
    """The other direction: ik_llama.cpp's own quantiser turns bitlm's I2_S file into its types,
    and bitlm reads those bytes back as the same model (T, s and logits bit for bit)."""
    theirs = tmp_path / f"ik-{kind}.gguf"
    _run(_bin("llama-quantize"), "--allow-requantize", "--token-embedding-type", "f16", "--output-tensor-type", "f16",
         str(files["i2s_bitlm"]), str(theirs), kind, cwd=tmp_path)
    with read_gguf(theirs) as f:
        relu2 = recited.config.arch == "bitnet-2b4t"  # the architecture is kept from the I2_S file
        assert f.metadata["general.architecture"] == ("bitnet-b1.58" if relu2 else "bitnet")
        assert f.tensors["blk.0.ffn_down.weight"].type_name == kind.upper()
    x = torch.randint(0, recited.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_gguf(theirs)(x), frozen_reference(recited, f16_head=True)(x))


def test_bitlm_reads_ik_llama_quantize_default_q6_k_embedding(recited, files, tmp_path):
    """Without the type flags ik's llama-quantize also requantises the tied embedding (to Q6_K for
    IQ2_BN): bitlm reads that head as gguf.quants dequantises it, and the projections exactly."""
    import gguf
    import numpy as np

    theirs = tmp_path / "ik-default.gguf"
    _run(_bin("llama-quantize"), "--allow-requantize", str(files["i2s_bitlm"]), str(theirs), "iq2_bn", cwd=tmp_path)
    with read_gguf(theirs) as f:
        assert f.tensors["token_embd.weight"].type_name == "Q6_K"
        want = gguf.quants.dequantize(f.raw("token_embd.weight"), gguf.GGMLQuantizationType.Q6_K)
    loaded = load_gguf(theirs)
    assert np.array_equal(loaded.model.embed_tokens.weight.detach().numpy(), want.astype(np.float32))
    for i in range(recited.config.n_layers):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            t, s = recited.get_submodule(f"model.layers.{i}.{proj}").quantized_weight()
            t2, s2 = loaded.get_submodule(f"model.layers.{i}.{proj}").quantized_weight()
            assert torch.equal(t, t2) and torch.equal(s, s2)
