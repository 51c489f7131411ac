"""formats/hf.py: folders written by transformers' save_pretrained (and lowgear.bench.synthetic), and bad inputs."""

import json
import os

import pytest
import torch

from lowgear.errors import ModelFormatError, UnsupportedError
from lowgear.bench.synthetic import write_hf
from lowgear.formats import HFSource, open_weights

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

HF_TO_CANON = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
    "model.layers.1.self_attn.q_proj.weight": "layers.1.q",
    "model.layers.1.self_attn.k_proj.weight": "layers.1.k",
    "model.layers.0.self_attn.v_proj.weight": "layers.0.v",
    "model.layers.0.self_attn.o_proj.weight": "layers.0.o",
    "model.layers.0.input_layernorm.weight": "layers.0.attn_norm",
    "model.layers.1.post_attention_layernorm.weight": "layers.1.ffn_norm",
    "model.layers.1.mlp.gate_proj.weight": "layers.1.gate",
    "model.layers.0.mlp.up_proj.weight": "layers.0.up",
    "model.layers.1.mlp.down_proj.weight": "layers.1.down",
}


def save(folder, config, **kwargs):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder, **kwargs)
    return {k: v.detach() for k, v in model.state_dict().items()}


def check_tensors(src, state):
    for hf_name, canon in HF_TO_CANON.items():
        if hf_name in state and canon in src.names():
            t = src.get(canon)
            torch.testing.assert_close(t, state[hf_name], rtol=0, atol=0)
            assert src.info(canon).shape == tuple(t.shape)


def test_llama_llama3_scaling(tmp_path):
    cfg = transformers.LlamaConfig(
        **TINY, rope_theta=500000.0, bos_token_id=1, eos_token_id=[2, 3],
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128},
    )
    state = save(tmp_path, cfg)
    src = open_weights(tmp_path)
    assert isinstance(src, HFSource)
    s = src.spec
    assert (s.arch, s.vocab_size, s.hidden_size, s.intermediate_size, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (
        "llama", 96, 32, 48, 2, 4, 2, 8)
    assert s.rope_style == "neox" and s.rope_theta == 500000.0 and not s.attention_bias
    assert s.rope_scaling == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 128}
    assert s.bos_token_id == 1 and s.eos_token_ids == (2, 3) and s.max_position_embeddings == 256
    assert not s.tie_word_embeddings and "lm_head" in src.names()
    check_tensors(src, state)


def test_mistral_sliding_window_sharded(tmp_path):
    cfg = transformers.MistralConfig(**TINY, sliding_window=64, head_dim=16)
    state = save(tmp_path, cfg, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    src = open_weights(tmp_path)
    assert src.spec.arch == "mistral" and src.spec.sliding_window == 64 and src.spec.head_dim == 16
    assert src.get("layers.1.q").shape == (64, 32)
    check_tensors(src, state)


def test_qwen2_bias_and_tied(tmp_path):
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True, sliding_window=64, use_sliding_window=False,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0})
    state = save(tmp_path, cfg)
    src = open_weights(tmp_path)
    s = src.spec
    assert s.arch == "qwen2" and s.attention_bias and s.tie_word_embeddings and s.sliding_window is None
    assert s.rope_scaling == {"type": "linear", "factor": 2.0}
    torch.testing.assert_close(src.get("layers.1.q_bias"), state["model.layers.1.self_attn.q_proj.bias"], rtol=0, atol=0)
    assert "lm_head" not in src.names()
    check_tensors(src, state)


def test_bfloat16_checkpoint(tmp_path):
    cfg = transformers.LlamaConfig(**TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    src = open_weights(tmp_path)
    assert src.get("layers.0.q").dtype == torch.bfloat16 and src.info("layers.0.q").qtype == "BF16"
    assert src.nbytes("layers.0.q") == 32 * 32 * 2


def test_synthetic_folder_loads_in_transformers(tmp_path):
    write_hf(tmp_path, arch="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
             dtype="float32", max_shard_bytes=30_000, seed=2)
    src = open_weights(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    check_tensors(src, {k: v.detach() for k, v in model.state_dict().items()})


# ------------------------------------------------------------------------------------ bad inputs


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedError, match="'bert'.*llama, mistral, qwen2"):
        open_weights(tmp_path)


def test_no_weights(tmp_path):
    write_hf(tmp_path, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(ModelFormatError, match=r"no \*\.safetensors in"):
        open_weights(tmp_path)


def test_missing_shard(tmp_path):
    write_hf(tmp_path, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, max_shard_bytes=20_000)
    shards = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    os.remove(tmp_path / shards[-1])
    with pytest.raises(ModelFormatError, match="missing; download every shard"):
        open_weights(tmp_path)


def test_no_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="no config.json"):
        open_weights(tmp_path)


def test_corrupt_safetensors(tmp_path):
    write_hf(tmp_path, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        open_weights(tmp_path)


def test_unsupported_rope_scaling(tmp_path):
    write_hf(tmp_path, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=48,
             rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedError, match="'yarn'"):
        open_weights(tmp_path)
