"""Qwen3 (dense) against Hugging Face transformers: per-head RMSNorm on q and k before RoPE, no qkv bias,
head_dim from the config (here unlike hidden / heads), tied or untied head.

The reference is transformers' own Qwen3ForCausalLM on a tiny random model it writes itself; the same
weights are then written as a GGUF under llama.cpp's names (`blk.N.attn_q_norm` / `attn_k_norm`,
`qwen3.*` keys, q/k rows not permuted, as llama.cpp's converter does for the qwen family), which must
give the folder's logits. Batched == alone on every CPU rung uses the synthetic qwen3 GGUF writer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowgear as lg
from helpers import all_logits, close_gguf, gguf_writer_for, greedy_together, hf_greedy, hf_logits, interpreter_index_shim, load, use_ops
from lowgear.errors import ModelFormatError, UnsupportedError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 300
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, max_position_embeddings=256, rms_norm_eps=1e-6,
             rope_theta=1000000.0, tie_word_embeddings=False)
# float32 on both sides, same weights: only summation order differs. Measured: logits here are |x| < 0.7
# and lowgear's differ from transformers' by <= 2e-7 (fused q|k|v; 0 unfused), so 2e-4 is ~1000x headroom,
# while a skipped q_norm moves them by ~0.3 and k_norm applied before the head split by ~0.05 (both
# planted and seen to fail here), 200x and more past the tolerance.
ATOL, RTOL = 2e-4, 1e-4


def write_qwen3(folder, **overrides):
    """transformers' own tiny random Qwen3, saved as a float32 folder, with lowgear's byte tokenizer beside it."""
    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer

    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # norms away from 1 (q_norm / k_norm too), so that a wrong or skipped norm shows
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer(folder, byte_vocab(VOCAB))
    return hf


_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        i, part = base[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{_GGUF_LAYER[part]}.weight"
    return f"{_GGUF_GLOBAL[base]}.weight"


def write_qwen3_gguf(path, hf, drop: tuple[str, ...] = ()) -> str:
    """`hf`'s weights as llama.cpp's convert_hf_to_gguf.py writes a Qwen3 (F32, no q/k permutation)."""
    cfg = hf.config
    w = gguf_writer_for(path, "qwen3", cfg, cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    state = hf.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        if gguf_name(name) not in drop:
            w.add_tensor(gguf_name(name), t.detach().float().numpy().astype(np.float32))
    return close_gguf(w, path)


def ids_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["untied", "tied"])
def qwen3(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3") / request.param
    hf = write_qwen3(folder, tie_word_embeddings=request.param == "tied")
    return hf, folder


def test_spec_reads_qwen3(qwen3):
    hf, folder = qwen3
    spec = lg.Config(str(folder)).spec
    assert (spec.arch, spec.qk_norm, spec.head_dim, spec.attention_bias, spec.rope_style) == ("qwen3", True, 24, False, "neox")
    assert spec.tie_word_embeddings == hf.config.tie_word_embeddings


def test_logits_match_transformers(qwen3):
    hf, folder = qwen3
    model, cache = load(folder)
    ids = ids_of(37)
    ours = all_logits(model, cache, ids)
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_greedy_32_tokens_match_transformers(qwen3):
    hf, folder = qwen3
    prompts = [ids_of(n, seed=10 + k) for k, n in enumerate((11, 5, 23))]
    assert greedy_together(*load(folder), prompts) == [hf_greedy(hf, p) for p in prompts]


def test_gguf_gives_the_folders_logits(qwen3, tmp_path):
    hf, folder = qwen3
    path = write_qwen3_gguf(tmp_path / "qwen3.gguf", hf)
    spec = lg.Config(path).spec
    assert (spec.arch, spec.qk_norm, spec.head_dim, spec.rope_style) == ("qwen3", True, 24, "neox")
    assert spec.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = ids_of(29, seed=4)
    from_gguf = all_logits(*load(path), ids)
    from_folder = all_logits(*load(folder), ids)
    torch.testing.assert_close(from_gguf, from_folder, atol=1e-5, rtol=1e-5)  # same float32 weights, same code
    torch.testing.assert_close(from_gguf, hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_triton_ops_paged_steps_match_transformers(qwen3, fuse):
    """The Triton ops (the CUDA path's rms_norm over q/k heads, rope, KV write; interpreted without a
    GPU), prefilled together and decoded a token at a time through a paged cache."""
    from lowgear.attention.metadata import build_metadata
    from lowgear.ops import dispatch

    pytest.importorskip("triton")
    hf, folder = qwen3
    if hf.config.tie_word_embeddings:
        pytest.skip("the untied model covers the ops; the head is not what differs")
    model, cache = load(folder, max_seq_len=64, page_size=4, no_fuse=not fuse)
    use_ops(model, dispatch.triton_ops())
    seqs, tables, done = [ids_of(11, 5), ids_of(7, 6)], [[2, 0, 3], [1, 4]], [0, 0]
    want = [hf_logits(hf, s) for s in seqs]
    with interpreter_index_shim():
        for q_lens in ([7, 5], [1, 1], [1, 1], [1, 0]):
            live = [i for i, n in enumerate(q_lens) if n]
            kv_lens = [done[i] + q_lens[i] for i in live]
            meta = build_metadata([q_lens[i] for i in live], kv_lens, [tables[i] for i in live], 4, logits="all")
            ids = torch.tensor([t for i in live for t in seqs[i][done[i]:done[i] + q_lens[i]]])
            expect = torch.cat([want[i][done[i]:done[i] + q_lens[i]] for i in live])
            torch.testing.assert_close(model.forward(ids, meta, cache).cpu(), expect, atol=ATOL, rtol=RTOL)
            for i in live:
                done[i] += q_lens[i]


# ------------------------------------------------------------------ batched == alone on every CPU rung


@pytest.fixture(scope="module")
def synthetic_qwen3(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = tmp_path_factory.mktemp("synth") / "qwen3.gguf"
    write_gguf(path, arch="qwen3", hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
               intermediate_size=96, qtype="Q8_0", seed=5)
    return str(path)


@pytest.fixture(scope="module")
def alone(synthetic_qwen3):
    from test_generator import prompts, runs_alone

    return runs_alone(synthetic_qwen3, prompts(4, lengths=(5, 17, 33, 9)))


@pytest.mark.parametrize("rung", ["eager", "sdpa", "triton"])
def test_batch_equals_alone(synthetic_qwen3, alone, rung):
    from test_generator import run_batched

    ids, want = alone
    gen, got = run_batched(synthetic_qwen3, rung, ids)
    assert gen.model.layers[0].attn.q_norm is not None
    assert got == want


def test_synthetic_hf_qwen3_is_transformers_qwen3(tmp_path):
    """write_hf's qwen3 folder loads in transformers as Qwen3 with its q/k norms, and lowgear agrees with it."""
    from lowgear.bench.synthetic import write_hf

    folder = write_hf(tmp_path / "q3", arch="qwen3", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=24, intermediate_size=96, vocab_size=VOCAB, seed=2, std=0.2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    assert not torch.all(hf.model.layers[0].self_attn.q_norm.weight == 1)  # read from the file, not initialised
    ids = ids_of(19, seed=7)
    torch.testing.assert_close(all_logits(*load(folder), ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ bad files say what is wrong


def test_gguf_missing_k_norm_names_the_tensor(qwen3, tmp_path):
    hf, _ = qwen3
    path = write_qwen3_gguf(tmp_path / "no_k_norm.gguf", hf, drop=("blk.1.attn_k_norm.weight",))
    with pytest.raises(ModelFormatError, match=r"layer 1 has no k_norm .*blk\.1\.attn_k_norm\.weight.*qwen3 needs"):
        lg.Config(path)


def test_unsupported_qwen_variants_name_themselves(tmp_path):
    from lowgear.bench.synthetic import write_gguf, write_hf

    path = write_gguf(tmp_path / "moe.gguf", arch="qwen3next", tokenizer=None)
    with pytest.raises(UnsupportedError, match=r"architecture 'qwen3next' is not supported: lowgear runs .*qwen3"):
        lg.Config(path)
    folder = write_hf(tmp_path / "moe", arch="qwen3_next", tokenizer=None)
    with pytest.raises(UnsupportedError, match=r"architecture 'qwen3_next' is not supported"):
        lg.Config(str(folder))


def test_partial_sliding_window_is_refused(tmp_path):
    folder = tmp_path / "window"
    write_qwen3(folder, num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(UnsupportedError, match="some layers only"):
        lg.Config(str(folder))


def test_bench_preset_and_peer_are_qwen3():
    """`lowgear bench --preset qwen3-8b`: random tensors of every shape the architecture needs (q/k norms
    included), and the transformers peer is a Qwen3 of the same shapes."""
    import dataclasses

    from lowgear.bench.models import PRESETS, RandomSource
    from lowgear.bench.peer import hf_config
    from lowgear.formats.validate import expected_shapes

    spec = PRESETS["qwen3-8b"]
    shapes = RandomSource(spec, "Q4_0", torch.device("meta"), torch.float16).shapes
    expected = expected_shapes(spec)
    assert "layers.35.k_norm" in shapes and all(expected[n] == shapes[n] for n in shapes)
    small = dataclasses.replace(spec, num_layers=1, hidden_size=64, intermediate_size=64, vocab_size=VOCAB)
    peer = transformers.AutoModelForCausalLM.from_config(hf_config(small, "eager"))
    assert type(peer).__name__ == "Qwen3ForCausalLM" and peer.model.layers[0].self_attn.q_norm.weight.shape == (128,)
