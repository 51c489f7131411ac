"""lowgear.bench.synthetic: random GGUF / HF models that are complete, deterministic and readable."""

import filecmp
import json

import numpy as np
import pytest
import torch

import lowgear.bench.synthetic as syn
from lowgear.errors import ConfigError
from lowgear.formats import dequantize
from lowgear.formats import PackedTensor, open_weights

SHAPE = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=96)


def test_byte_vocab():
    v = syn.byte_vocab()
    alphabet = syn.byte_alphabet()
    assert len(set(alphabet)) == 256 and alphabet[ord("a")] == "a" and alphabet[32] == "Ġ"
    assert v.tokens[:256] == alphabet
    for merge in v.merges:
        a, b = merge.split(" ")
        assert a in v.tokens and b in v.tokens and a + b in v.tokens
    assert [v.tokens[i] for i in (v.bos_id, v.eos_id, v.pad_id)] == ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    assert {v.token_types[i] for i in (v.bos_id, v.eos_id, v.pad_id)} == {3}
    padded = syn.byte_vocab(1000)
    assert len(padded.tokens) == len(padded.token_types) == 1000 and padded.token_types[-1] == 5


def test_gguf_is_deterministic(tmp_path):
    a = syn.write_gguf(tmp_path / "a.gguf", qtype="Q4_0", seed=7, **SHAPE)
    b = syn.write_gguf(tmp_path / "b.gguf", qtype="Q4_0", seed=7, **SHAPE)
    c = syn.write_gguf(tmp_path / "c.gguf", qtype="Q4_0", seed=8, **SHAPE)
    assert filecmp.cmp(a, b, shallow=False) and not filecmp.cmp(a, c, shallow=False)


def test_gguf_tokenizer_metadata(tmp_path):
    src = open_weights(syn.write_gguf(tmp_path / "t.gguf", vocab_size=300, **SHAPE))
    tokens = src.metadata("tokenizer.ggml.tokens")
    assert src.metadata("tokenizer.ggml.model") == "gpt2" and len(tokens) == 300 == src.spec.vocab_size
    assert tokens[src.spec.bos_token_id] == "<|im_start|>" and tokens[src.spec.eos_token_ids[0]] == "<|im_end|>"
    assert "<|im_start|>" in src.spec.extra["chat_template"]


def test_random_block_path_for_large_tensors(tmp_path, monkeypatch):
    monkeypatch.setattr(syn.common, "QUANTIZE_MAX_ELEMENTS", 0)  # the quantizer path stops at this size
    src = open_weights(syn.write_gguf(tmp_path / "r.gguf", qtype="Q8_0", progress=True, **SHAPE))
    w = src.get("layers.0.gate")
    assert isinstance(w, PackedTensor)
    values = dequantize(w)
    assert torch.isfinite(values).all() and 0.005 < float(values.std()) < 0.08


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="Q4_K"):
        syn.write_gguf(tmp_path / "x.gguf", qtype="Q3_X", **SHAPE)
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        syn.write_gguf(tmp_path / "x.gguf", hidden_size=64, num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="bfloat16"):
        syn.write_hf(tmp_path / "h", dtype="int8")


def test_bf16_rounding_matches_torch():
    x = np.random.default_rng(0).standard_normal(10_000).astype(np.float32)
    ours = syn.common._to_bf16_bytes(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)


def test_hf_folder(tmp_path):
    syn.write_hf(tmp_path, arch="qwen2", dtype="bfloat16", tie_word_embeddings=True, seed=1, **SHAPE)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    src = open_weights(tmp_path)
    assert src.spec.tie_word_embeddings and src.spec.attention_bias
    assert src.get("layers.0.q").dtype == torch.bfloat16
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "hello there <|im_start|>user"
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids.count(src.spec.bos_token_id) == 1  # the special token is one id, not its characters


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_lowgear_tokenizer_reads_it(tmp_path, kind):
    try:
        from lowgear.tokenizer import Tokenizer
    except ImportError:
        pytest.skip("lowgear.tokenizer is not available")
    path = syn.write_gguf(tmp_path / "m.gguf", **SHAPE) if kind == "gguf" else syn.write_hf(tmp_path / "m", **SHAPE)
    tok = Tokenizer(path)
    text = tok.decode(tok.encode("the cat sat"))
    assert (text[0] if isinstance(text, list) else text) == "the cat sat"


def test_byte_vocab_with_a_large_regular_part(tmp_path):
    """A Llama-3-sized vocabulary: 128000 ordinary BPE tokens, then 256 specials; a real tokenizer
    library loads it, and text (any bytes) round-trips through it."""
    from tokenizers import Tokenizer

    v = syn.byte_vocab(128256, regular=128000)
    assert len(v.tokens) == 128256 == len(set(v.tokens)) and v.token_types.count(1) == 128000
    assert v.token_types[:128000] == [1] * 128000 and set(v.token_types[128000:]) <= {3, 5}
    assert v.bos_id >= 128000 and v.tokens[v.bos_id] == "<|im_start|>"
    assert {len(t) for t in v.tokens[256 + len(syn.common._MERGES):128000]} == {2, 3}
    known = set(v.tokens[:128000])
    for merge in v.merges[::97]:
        a, b = merge.split(" ")
        assert a in known and b in known and a + b in known
    syn.write_hf_tokenizer(tmp_path, v)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 128256
    text = "the quick brown fox, ünïcödé ✓ 123\n" + bytes(range(32, 127)).decode()
    ids = tok.encode(text).ids
    assert len(ids) < 0.6 * len(text.encode()) and tok.decode(ids) == text  # merged, and exact
