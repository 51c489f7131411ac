"""Model files are checked as they open (issue 25): each bad file is one lowgear error naming the
tensor or field and what to do, never a traceback at the first step."""

import json
import os
import shutil
import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import lowgear as lg  # noqa: E402
from lowgear.bench.synthetic import write_gguf, write_hf  # noqa: E402
from lowgear.errors import ModelFormatError, UnsupportedError  # noqa: E402
from lowgear.tokenizer import Tokenizer  # noqa: E402

from gguf_edit import find_string, patch_bytes, rewrite_gguf  # noqa: E402

TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=48)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("v") / "base.gguf", seed=1, **TINY)


def open_all(path):
    """What `lowgear generate` does before the first step: the config (reader), the tokenizer, the model."""
    config = lg.Config(str(path))
    Tokenizer(config)
    model = lg.Model(config)
    model.load_autosplit(lg.Cache(model, max_seq_len=32))
    return model


def test_the_base_file_loads(base):
    assert open_all(base).loaded


def test_flipped_byte_in_tokenizer_string(base, tmp_path):
    path = shutil.copy(base, tmp_path / "flip.gguf")
    patch_bytes(path, find_string(path, "<|im_start|>") + 2, b"\xff")
    with pytest.raises(ModelFormatError, match=r"tokenizer\.ggml\.tokens\[\d+\] is not valid UTF-8.*re-download"):
        lg.Config(str(path))
    with pytest.raises(ModelFormatError, match="not valid UTF-8"):  # the tokenizer alone, from the path
        Tokenizer(str(path))


@pytest.mark.parametrize("tensor, shape", [
    ("blk.0.attn_q.weight", (40, 32)),  # more q rows than heads * head_dim
    ("blk.0.attn_output.weight", (32, 40)),  # o's input width wrong (not caught by the q/k/v fusion)
    ("blk.0.ffn_down.weight", (32, 32)),
    ("blk.0.attn_norm.weight", (33,)),
    ("output.weight", (200, 32)),  # lm_head with fewer rows than the embedding
])
def test_tensor_of_the_wrong_shape(base, tmp_path, tensor, shape):
    path = rewrite_gguf(base, tmp_path / "shape.gguf", tensors={tensor: np.zeros(shape)})
    with pytest.raises(ModelFormatError, match=rf"tensor '{tensor}' .* has shape \[{', '.join(map(str, shape))}\], but the architecture needs"):
        lg.Config(str(path))


def test_quantized_norm_is_refused(base, tmp_path):
    q8 = np.zeros(34, dtype=np.uint8)  # one Q8_0 block: 32 weights, as [32]
    path = rewrite_gguf(base, tmp_path / "q.gguf", tensors={"output_norm.weight": (q8, gguf.GGMLQuantizationType.Q8_0)})
    with pytest.raises(ModelFormatError, match="output_norm.weight.*norms and biases must be F32"):
        lg.Config(str(path))


def test_vocabulary_larger_than_the_embedding(base, tmp_path):
    r = gguf.GGUFReader(base)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    path = rewrite_gguf(base, tmp_path / "vocab.gguf", meta={"tokenizer.ggml.tokens": tokens + ["x1", "x2"],
                                                             "tokenizer.ggml.token_type": types + [1, 1]})
    with pytest.raises(ModelFormatError, match=r"271 tokens .* token_embd.weight has 269 rows"):
        open_all(path)


def test_hf_tokenizer_larger_than_the_embedding(tmp_path):
    folder = write_hf(tmp_path / "m", **TINY)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    small = write_hf(tmp_path / "small", vocab_size=cfg["vocab_size"], tokenizer=None, **TINY)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(folder, name), small)
    config = lg.Config(small)
    object.__setattr__(config.spec, "vocab_size", cfg["vocab_size"] - 3)  # as a folder whose tokenizer grew
    with pytest.raises(ModelFormatError, match="tokenizer has .* embedding table has"):
        Tokenizer(config)


def test_merge_naming_a_missing_token(base, tmp_path):
    merges = gguf.GGUFReader(base).fields["tokenizer.ggml.merges"].contents()
    path = rewrite_gguf(base, tmp_path / "merge.gguf", meta={"tokenizer.ggml.merges": merges + ["zzqq xxyy"]})
    with pytest.raises(ModelFormatError, match=r"merges\[\d+\] \('zzqq xxyy'\) names 'zzqq'.*not in tokenizer.ggml.tokens"):
        open_all(path)


def test_newer_gguf_version(base, tmp_path):
    path = shutil.copy(base, tmp_path / "v99.gguf")
    patch_bytes(path, 4, struct.pack("<I", 99))
    with pytest.raises(UnsupportedError, match="GGUF version 99, newer than .* upgrade lowgear") as e:
        lg.Config(str(path))
    assert "truncated" not in str(e.value) and "corrupt" not in str(e.value)


@pytest.mark.parametrize("key, value, match", [
    ("llama.attention.head_count", 0, "num_heads is 0"),  # was ZeroDivisionError
    ("llama.attention.head_count_kv", 3, "num_kv_heads is 3, but it must divide num_heads"),
    ("tokenizer.ggml.eos_token_id", 10**6, "eos_token_id is 1000000"),
])
def test_impossible_header_values(base, tmp_path, key, value, match):
    path = rewrite_gguf(base, tmp_path / "h.gguf", meta={key: value})
    with pytest.raises(ModelFormatError, match=match):
        lg.Config(str(path))


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size", "64", "hidden_size is '64', not a whole number"),
    ("num_hidden_layers", None, "num_hidden_layers is None"),
    ("intermediate_size", 50, r"layers.0.mlp.down_proj.weight.*has shape \[32, 48\], but the architecture needs \[32, 50\]"),
    ("rope_scaling", "linear", "malformed value"),
])
def test_hf_config_fields(tmp_path, field, value, match):
    folder = write_hf(tmp_path / "m", **TINY)
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg[field] = value
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ModelFormatError, match=match):
        lg.Config(folder)
