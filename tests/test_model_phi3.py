"""Phi-3 / Phi-3.5 / Phi-4-mini (phi3) against Hugging Face transformers: fused qkv_proj and gate_up_proj,
LongRoPE (short and long factors, the attention factor), partial rotary, tied embeddings, a sliding window.

The reference is transformers' own Phi3ForCausalLM on a tiny random model it writes itself; the same
weights written as a GGUF under llama.cpp's phi3 names (`attn_qkv`, `ffn_up` holding gate|up,
`rope_factors_short` / `rope_factors_long`, `phi3.rope.*` keys, as convert_hf_to_gguf.py writes them)
must give the folder's logits. Batched == alone runs on every CPU rung from that GGUF.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowgear as lg
from helpers import all_logits, close_gguf, gguf_writer_for, greedy_together, hf_greedy, hf_logits, interpreter_index_shim, load, use_ops

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 300
ORIGINAL = 160  # original_max_position_embeddings: a 170-token prompt takes the long factors
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=640, original_max_position_embeddings=ORIGINAL,
             rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
HEAD_DIM = 16
# float32 on both sides, same weights: only summation order differs. Logits here are |x| < 1; measured
# differences are ~1e-6, so 2e-4 leaves ~100x headroom, while the planted mistakes this file is about
# (short factors where long ones apply, the attention factor left out, the whole head rotated instead of
# the partial part, gate and up swapped) move logits by 1e-2 and more.
ATOL, RTOL = 2e-4, 1e-4

VARIANTS = {
    # Phi-3-mini-4k-like: plain RoPE over the whole head, a sliding window shorter than the prompts
    "window": dict(sliding_window=24),
    # Phi-3.5-like LongRoPE, here over half of each head (a power-of-two half: the Triton rope kernel runs)
    "longrope-partial50": dict(partial_rotary_factor=0.5, longrope=True),
    # Phi-4-mini-like: LongRoPE over 0.75 of each head, tied embeddings
    "longrope-partial75-tied": dict(partial_rotary_factor=0.75, longrope=True, tie_word_embeddings=True),
}


def rope_config(partial: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    half = int(HEAD_DIM * partial) // 2
    return {"rope_type": "longrope", "rope_theta": SHAPE["rope_theta"], "partial_rotary_factor": partial,
            "short_factor": (1 + 0.5 * torch.rand(half, generator=g)).tolist(),
            "long_factor": (2 + 6 * torch.rand(half, generator=g)).tolist(),
            "original_max_position_embeddings": ORIGINAL}


def write_phi3(folder, variant: str):
    """transformers' own tiny random Phi3, saved as a float32 folder, with lowgear's byte tokenizer beside it."""
    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer

    opts = dict(VARIANTS[variant])
    partial = opts.pop("partial_rotary_factor", 1.0)
    cfg = {**SHAPE, **{k: v for k, v in opts.items() if k != "longrope"}}
    if opts.get("longrope"):
        cfg["rope_parameters"] = rope_config(partial, seed=3)
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": SHAPE["rope_theta"],
                                  "partial_rotary_factor": partial}
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(transformers.Phi3Config(**cfg)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.mul_(2.5)  # weights large enough that rope's details move the logits
    hf.save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer(folder, byte_vocab(VOCAB))
    return hf


def write_phi3_gguf(path, hf, qtype: str | None = None) -> str:
    """`hf`'s weights as llama.cpp's convert_hf_to_gguf.py writes a Phi-3 (F32, q/k not permuted). With
    `qtype` the layers' linears are stored quantized by gguf-py, and `hf`'s weights become gguf-py's
    dequantization of them (so that `hf` stays the reference for the file)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    from lowgear.bench.synthetic import byte_vocab, write_gguf_tokenizer

    cfg = hf.config
    rope = cfg.rope_parameters
    w = gguf_writer_for(path, "phi3", cfg)
    w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    w.add_rope_dimension_count(int(HEAD_DIM * rope.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(float(rope["rope_theta"]))
    w.add_sliding_window(cfg.sliding_window or 0)
    if rope.get("rope_type") == "longrope":
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings)))
        w.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
    layer = {"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    ends = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    state = hf.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        base = name.removesuffix(".weight")
        if base.startswith("model.layers."):
            i, part = base[len("model.layers."):].split(".", 1)
            out = f"blk.{i}.{layer[part]}.weight"
        else:
            out = f"{ends[base]}.weight"
        values = t.detach().float().numpy().astype(np.float32)
        ty = GGMLQuantizationType[qtype] if qtype is not None else None
        # rows that are not whole blocks (ffn_down's 112) stay F32, as llama.cpp's quantizer leaves them
        if ty is not None and out.startswith("blk.") and values.ndim == 2 and values.shape[1] % GGML_QUANT_SIZES[ty][0] == 0:
            packed = quants.quantize(values, ty)
            with torch.no_grad():
                t.copy_(torch.from_numpy(quants.dequantize(packed, ty).reshape(values.shape)))
            w.add_tensor(out, packed, raw_dtype=ty)
        else:
            w.add_tensor(out, values)
    write_gguf_tokenizer(w, byte_vocab(VOCAB))
    return close_gguf(w, path)


def ids_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(VARIANTS))
def phi3(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3") / request.param
    return request.param, write_phi3(folder, request.param), folder


def test_spec_reads_phi3(phi3):
    variant, hf, folder = phi3
    spec = lg.Config(str(folder)).spec
    opts = VARIANTS[variant]
    assert (spec.arch, spec.head_dim, spec.rope_style, spec.attention_bias) == ("phi3", HEAD_DIM, "neox", False)
    assert spec.rotary_dim == (None if "partial_rotary_factor" not in opts else int(HEAD_DIM * opts["partial_rotary_factor"]))
    assert spec.tie_word_embeddings == bool(opts.get("tie_word_embeddings"))
    assert spec.sliding_window == opts.get("sliding_window")
    if opts.get("longrope"):
        # the attention factor as the Phi-3 paper / transformers define it, from the two context lengths
        assert spec.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(640 / ORIGINAL) / math.log(ORIGINAL)))
        assert spec.rope_scaling["long_factor"] == pytest.approx(hf.config.rope_parameters["long_factor"])
    else:
        assert spec.rope_scaling is None


def test_fused_weights_are_held_once(phi3):
    """q|k|v and gate|up load as one linear each, holding exactly the stored rows."""
    _, hf, folder = phi3
    model, _ = load(folder, max_seq_len=ORIGINAL)
    layer = model.layers[1]
    assert layer.attn.qkv is not None and layer.attn.q is None and layer.mlp.gate_up is not None
    torch.testing.assert_close(layer.attn.qkv.weight, hf.model.layers[1].self_attn.qkv_proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.mlp.gate_up.weight, hf.model.layers[1].mlp.gate_up_proj.weight, rtol=0, atol=0)


def test_logits_match_transformers(phi3):
    _, hf, folder = phi3
    model, cache = load(folder, max_seq_len=ORIGINAL)  # sequences fit the original context: short factors
    ids = ids_of(37)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_long_prompt_takes_the_long_factors(phi3):
    """A 170-token prompt (> original_max_position_embeddings = 160): transformers turns to the long factors,
    and so does lowgear, whose cache here holds sequences past the original context."""
    variant, hf, folder = phi3
    ids = ids_of(170, seed=2)
    want = hf_logits(hf, ids)
    model, cache = load(folder, max_seq_len=512)
    ours = all_logits(model, cache, ids)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=RTOL)
    if VARIANTS[variant].get("longrope"):
        # the short factors (what the first 160 positions alone would take) give other logits here: the test
        # tells the two apart
        short = hf_logits(hf, ids[:ORIGINAL])
        assert (short[-1] - want[ORIGINAL - 1]).abs().max() > 50 * ATOL


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_greedy_32_tokens_match_transformers(phi3, long):
    variant, hf, folder = phi3
    if long and variant != "longrope-partial75-tied":
        pytest.skip("the Phi-4-mini-like variant covers the long factors over 32 tokens (time)")
    prompts = [ids_of(n, seed=10 + k) for k, n in enumerate((170, 165) if long else (11, 5, 23))]
    model, cache = load(folder, max_seq_len=512 if long else ORIGINAL)
    assert greedy_together(model, cache, prompts) == [hf_greedy(hf, p) for p in prompts]


def test_gguf_gives_the_folders_logits(phi3, tmp_path):
    variant, hf, folder = phi3
    path = write_phi3_gguf(tmp_path / "phi3.gguf", hf)
    source = lg.Config(path).source
    spec, folder_spec = source.spec, lg.Config(str(folder)).spec
    assert spec.rotary_dim == folder_spec.rotary_dim and spec.sliding_window == folder_spec.sliding_window
    assert spec.tie_word_embeddings == folder_spec.tie_word_embeddings and spec.rope_style == "neox"
    if VARIANTS[variant].get("longrope"):
        assert spec.rope_scaling["short_factor"] == pytest.approx(folder_spec.rope_scaling["short_factor"])
        assert spec.rope_scaling["attention_factor"] == pytest.approx(folder_spec.rope_scaling["attention_factor"])
    assert "layers.0.q" in source.names() and "layers.0.qkv" not in source.names()
    for max_seq_len, ids in ((ORIGINAL, ids_of(29, seed=4)), (512, ids_of(170, seed=5))):
        from_gguf = all_logits(*load(path, max_seq_len=max_seq_len), ids)
        from_folder = all_logits(*load(folder, max_seq_len=max_seq_len), ids)
        torch.testing.assert_close(from_gguf, from_folder, atol=1e-5, rtol=1e-5)  # same float32 weights, same code


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_gguf_matches_transformers_on_its_dequantized_weights(tmp_path, qtype):
    """attn_qkv and ffn_up stored packed: the parts are block rows of them, fused back without unpacking."""
    hf = write_phi3(tmp_path / "hf", "longrope-partial75-tied")
    path = write_phi3_gguf(tmp_path / "q.gguf", hf, qtype)  # hf now holds gguf-py's dequantized weights
    source = lg.Config(path).source
    info = source.info("layers.0.k")
    assert info.qtype == qtype and info.shape == (2 * HEAD_DIM, 64)
    model, cache = load(path, max_seq_len=ORIGINAL, cpu_weights="packed")
    assert model.layers[0].attn.qkv.qtype == qtype and model.layers[0].mlp.gate_up.packed
    ids = ids_of(31, seed=8)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_triton_ops_paged_steps_match_transformers(phi3, fuse):
    """The Triton ops (rms_norm, the partial-rotary rope + KV write, 6 of 8 pairs rotated in the 0.75 variant;
    interpreted without a GPU), prefilled together and decoded a token at a time through a paged cache."""
    from lowgear.attention.metadata import build_metadata
    from lowgear.ops import dispatch

    pytest.importorskip("triton")
    variant, hf, folder = phi3
    if variant == "window" and not fuse:
        pytest.skip("the unfused linears are covered by the other variants")
    model, cache = load(folder, max_seq_len=ORIGINAL, page_size=4, no_fuse=not fuse)
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
def phi3_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-batch")
    hf = write_phi3(folder / "hf", "longrope-partial50")
    return write_phi3_gguf(folder / "phi3.gguf", hf)


@pytest.fixture(scope="module")
def alone(phi3_gguf):
    from test_generator import make, prompts, run

    gen = make(phi3_gguf, "eager", max_seq_len=ORIGINAL, max_batch_size=1, paged=False)
    ids = prompts(3, lengths=(5, 33, 9))
    return ids, [run(gen, [p])[0] for p in ids]


@pytest.mark.parametrize("rung", ["eager", "sdpa", "triton"])
def test_batch_equals_alone(phi3_gguf, alone, rung):
    from test_generator import make, run

    ids, want = alone
    gen = make(phi3_gguf, rung, max_seq_len=ORIGINAL, max_batch_size=len(ids), max_chunk_size=12)
    assert gen.model.selections["cpu"].backend.name == rung
    assert gen.model.layers[0].attn.qkv is not None
    assert run(gen, ids, arrive_late=(2,), late_after=2) == want


# ------------------------------------------------------------------ the chat template

# Phi-3-mini-instruct's chat_template, as its tokenizer_config.json holds it
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_phi3_chat_template_renders_like_transformers(tmp_path):
    import json

    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer
    from lowgear.tokenizer import Tokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    write_hf_tokenizer(folder, byte_vocab(VOCAB))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": PHI3_TEMPLATE}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    ours = Tokenizer(str(folder)).apply_chat_template(messages, add_generation_prompt=True)
    assert ours == ("<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
                    "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                  chat_template=PHI3_TEMPLATE)
    assert ours == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------ configs as published


def phi4_mini_config(**changes) -> dict:
    """Phi-4-mini-instruct's config.json in the transformers-4 style it ships in (factor values made up)."""
    return {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
            "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "partial_rotary_factor": 0.75, "rope_theta": 10000.0, "sliding_window": 262144,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, **changes}


def test_phi4_mini_config_as_published(tmp_path):
    from lowgear.formats.hf import spec_from_config
    from lowgear.model.rope import uses_long_factors

    spec = spec_from_config(phi4_mini_config(), str(tmp_path), has_lm_head=False)
    assert (spec.head_dim, spec.rotary_dim, spec.tie_word_embeddings, spec.sliding_window) == (128, 96, True, 262144)
    # sqrt(1 + ln(131072 / 4096) / ln(4096)) = sqrt(1 + 5 ln 2 / (12 ln 2)) = sqrt(17 / 12)
    assert spec.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(17 / 12), rel=1e-12)
    assert spec.rope_scaling["original_max_position_embeddings"] == 4096
    assert not uses_long_factors(spec, 4096) and uses_long_factors(spec, 4097)


def test_wrong_number_of_rope_factors_is_one_clear_error(tmp_path):
    from lowgear.errors import ModelFormatError
    from lowgear.formats.hf import spec_from_config
    from lowgear.formats.validate import check_spec

    scaling = {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 64}  # 64: a full head's pairs
    spec = spec_from_config(phi4_mini_config(rope_scaling=scaling), str(tmp_path), has_lm_head=False)
    with pytest.raises(ModelFormatError, match=r"rope long_factor is '64 values', but LongRoPE needs 48 positive factors"):
        check_spec(spec, "config.json")


def test_fused_exl2_linears_are_refused_in_one_line(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowgear.errors import UnsupportedError

    folder = tmp_path / "exl2"
    write_phi3(folder, "window")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.qkv_proj.q_weight"] = torch.zeros(4, 128, dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedError, match=r"EXL2 linears stored fused \(model\.layers\.0\.self_attn\.qkv_proj") as e:
        lg.Config(str(folder))
    assert "\n" not in str(e.value)


def test_fused_tensor_of_the_wrong_size_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowgear.errors import ModelFormatError

    folder = tmp_path / "bad"
    write_phi3(folder, "window")
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.2.mlp.gate_up_proj.weight"
    tensors[name] = tensors[name][:-16].clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"'model\.layers\.2\.mlp\.gate_up_proj\.weight' has 208 rows, but the "
                                               r"header's sizes need 224 \(gate \+ up\)"):
        lg.Config(str(folder))
