"""Gemma 2 and Gemma 3 (text) against Hugging Face transformers.

The reference is transformers' own Gemma2ForCausalLM / Gemma3ForCausalLM on a tiny random model it
writes itself: (1 + w) norms, embeddings times sqrt(hidden), norms after attention and after the MLP,
GeGLU, the softmax scale from query_pre_attn_scalar, sliding and global layers (gemma2 every other
layer; gemma3 here every third, with its own local RoPE base and linear rope scaling on the global
layers only), q/k norms (gemma3), attention and final logit soft-caps (gemma2). Windows are short (8)
so that the prompts run past them. The same weights written as a GGUF the way llama.cpp's converter
writes Gemma (its tensor names, every norm stored with its + 1, no q/k permutation) must give the
folder's logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import lowgear as lg
from helpers import all_logits, close_gguf, gguf_writer_for, greedy_together, hf_greedy, hf_logits, interpreter_index_shim, load, use_ops
from lowgear.errors import BackendUnavailableError, ModelFormatError

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 300
WINDOW = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW, max_position_embeddings=256)
MODELS = {
    # soft-caps small enough to bend these scores and logits (|scores| reach ~6, |logits| ~4 before capping)
    "gemma2": dict(arch="gemma2", num_hidden_layers=4, attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": dict(arch="gemma3", num_hidden_layers=6, sliding_window_pattern=3,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # Gemma's real head size: one kv head of 256 under two query heads
    "gemma3_hd256": dict(arch="gemma3", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=256, query_pre_attn_scalar=256, sliding_window_pattern=2),
}
# float32 on both sides, same weights: only summation order differs. Measured here: lowgear's logits
# (|x| up to ~6) differ from transformers' by <= 4e-6. 2e-4 leaves 50x headroom, while each of these
# planted faults moved them by 1.5 or more: no attention soft-cap (2.2), no final soft-cap (3.6), no
# embedding scale (4.8), the global RoPE base on gemma3's local layers (1.6), norms without their + 1 (3.9).
ATOL, RTOL = 2e-4, 1e-4


def write_gemma(folder, arch: str, **overrides):
    """transformers' own tiny random Gemma, float32, weights big enough that attention is not uniform
    and norms away from (1 + 0), with lowgear's byte tokenizer beside it."""
    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer

    torch.manual_seed(0)
    shape = {**COMMON, **overrides}
    if arch == "gemma2":
        hf = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**shape))
    else:
        hf = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**shape))
    hf.eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((0.3 if "norm" in name else 0.15) * torch.randn_like(p))
    hf.save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer(folder, byte_vocab(VOCAB))
    return hf


_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}


def gguf_name(hf_name: str) -> str:
    base = hf_name.removesuffix(".weight")
    if base.startswith("model.layers."):
        i, part = base[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{_GGUF_LAYER[part]}.weight"
    return f"{_GGUF_GLOBAL[base]}.weight"


def write_gemma_gguf(path, hf, drop: tuple[str, ...] = ()) -> str:
    """`hf`'s weights as llama.cpp's convert_hf_to_gguf.py writes a Gemma 2 / 3: F32, tied (no output
    tensor), every *norm.weight stored + 1, q/k not permuted, the keys its set_gguf_parameters writes."""
    cfg = hf.config
    arch = "gemma2" if cfg.model_type == "gemma2" else "gemma3"
    w = gguf_writer_for(path, arch, cfg, cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        full = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(float(full["rope_theta"]))
        if full.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(full["factor"]))
        types = cfg.layer_types
        w.add_sliding_window_pattern(types.index("full_attention") + 1)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":  # tied
            continue
        t = t.detach().float()
        if name.endswith("norm.weight"):
            t = t + 1  # llama.cpp's converter: "norm weights + 1", as Gemma's RMSNorm scales by 1 + w
        if gguf_name(name) not in drop:
            w.add_tensor(gguf_name(name), t.numpy().astype(np.float32))
    return close_gguf(w, path)


def ids_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(MODELS))
def gemma(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma") / request.param
    hf = write_gemma(folder, **MODELS[request.param])
    return request.param, hf, folder


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma") / "g2"
    return write_gemma(folder, **MODELS["gemma2"]), folder


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma") / "g3"
    return write_gemma(folder, **MODELS["gemma3"]), folder


def test_spec_reads_gemma(gemma2, gemma3):
    s2 = lg.Config(str(gemma2[1])).spec
    assert (s2.arch, s2.gemma_block, s2.qk_norm, s2.attn_softcap, s2.final_softcap) == ("gemma2", True, False, 2.0, 3.0)
    assert s2.sliding_layers == (True, False, True, False) and s2.sliding_window == WINDOW
    assert [s2.window_of(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    s3 = lg.Config(str(gemma3[1])).spec
    assert (s3.arch, s3.qk_norm, s3.attn_softcap, s3.final_softcap) == ("gemma3", True, None, None)
    assert s3.sliding_layers == (True, True, False, True, True, False)
    assert (s3.rope_theta, s3.rope_local_theta, s3.rope_scaling) == (1e6, 10000.0, {"type": "linear", "factor": 8.0})
    assert s3.tie_word_embeddings and s3.attn_scale == pytest.approx(32**-0.5)


def test_logits_match_transformers(gemma):
    _, hf, folder = gemma
    model, cache = load(folder)
    ids = ids_of(37)  # past the window of 8
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_query_pre_attn_scalar_is_the_softmax_scale(tmp_path):
    hf = write_gemma(tmp_path / "g", **{**MODELS["gemma2"], "query_pre_attn_scalar": 20})
    model, cache = load(tmp_path / "g")
    assert model.layers[0].attn.scale == pytest.approx(20**-0.5)
    ids = ids_of(21, seed=3)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("which", ["gemma2", "gemma3"])
def test_greedy_32_tokens_match_transformers(which, gemma2, gemma3):
    hf, folder = gemma2 if which == "gemma2" else gemma3
    model, cache = load(folder, attn_backend="eager")  # the rungs: test_batch_equals_alone_equals_transformers
    prompts = [ids_of(n, seed=10 + k) for k, n in enumerate((11, 3, 23))]
    assert greedy_together(model, cache, prompts) == [hf_greedy(hf, p) for p in prompts]


@pytest.mark.parametrize("which", ["gemma2", "gemma3"])
def test_gguf_gives_the_folders_logits(which, gemma2, gemma3, tmp_path):
    hf, folder = gemma2 if which == "gemma2" else gemma3
    path = write_gemma_gguf(tmp_path / f"{which}.gguf", hf)
    spec, folder_spec = lg.Config(path).spec, lg.Config(str(folder)).spec
    for field in ("arch", "rope_style", "sliding_window", "sliding_layers", "rope_theta", "rope_local_theta",
                  "rope_scaling", "attn_softcap", "final_softcap", "qk_norm", "tie_word_embeddings", "gemma_block"):
        assert getattr(spec, field) == getattr(folder_spec, field), field
    assert spec.attn_scale == pytest.approx(folder_spec.attn_scale)
    ids = ids_of(29, seed=4)
    from_gguf = all_logits(*load(path), ids)
    torch.testing.assert_close(from_gguf, all_logits(*load(folder), ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_gguf, hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_gemma3_image_text_folder_runs_its_language_model(gemma3, tmp_path):
    """A gemma3 checkpoint with a vision tower (model_type gemma3, text_config, the language model under
    model.language_model.*): the text model's logits, the vision tensors left unread and said so."""
    hf, folder = gemma3
    out = tmp_path / "mm"
    out.mkdir()
    tensors = {n.replace("model.", "model.language_model.", 1): t for n, t in load_file(str(folder / "model.safetensors")).items()}
    tensors["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    tensors["model.multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                 "text_config": {**text, "model_type": "gemma3_text"},
                                                 "vision_config": {"model_type": "siglip_vision_model"}}))
    config = lg.Config(str(out))
    assert config.spec.arch == "gemma3" and "text only" in config.spec.extra["text_only"]
    ids = ids_of(19, seed=8)
    torch.testing.assert_close(all_logits(*load(out), ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ the rungs: batched == alone == transformers


def _generator(folder, rung, batch):
    from test_generator import make

    return make(str(folder), rung, max_batch_size=batch, max_chunk_size=12)


@pytest.fixture(scope="module")
def alone(gemma2, gemma3):
    """Per model: prompts longer and shorter than the window, and transformers' greedy tokens for each."""
    ids = [ids_of(n, seed=20 + k) for k, n in enumerate((5, 19, 11))]
    return ids, {"gemma2": [hf_greedy(gemma2[0], p, 6) for p in ids], "gemma3": [hf_greedy(gemma3[0], p, 6) for p in ids]}


@pytest.mark.parametrize("rung", ["eager", "sdpa", "triton"])
@pytest.mark.parametrize("which", ["gemma2", "gemma3"])
def test_batch_equals_alone_equals_transformers(which, rung, gemma2, gemma3, alone):
    from test_generator import run

    folder = (gemma2 if which == "gemma2" else gemma3)[1]
    ids, want = alone[0], alone[1][which]
    if which == "gemma2" and rung == "sdpa":  # torch's sdpa cannot soft-cap: forcing it is refused, not wrong
        with pytest.raises(BackendUnavailableError, match="sdpa.*cannot soft-cap attention scores"):
            _generator(folder, rung, 1)
        return
    with interpreter_index_shim():
        one = _generator(folder, rung, 1)
        assert one.model.selections["cpu"].backend.name == rung
        assert run(one, [ids[1]], max_new=6) == [want[1]]  # alone: the prompt past the window
        many = _generator(folder, rung, len(ids))
        assert run(many, ids, max_new=6, arrive_late=(2,), late_after=2) == want  # batched, one arriving late


def test_ladder_skips_sdpa_for_soft_capped_models(gemma2, gemma3, monkeypatch):
    """On the CPU the ladder's first working rung is sdpa; gemma2 (soft-capped scores) takes the next
    one that can soft-cap, and the log — doctor's table — says why."""
    from lowgear.attention import select
    from lowgear.cli import doctor

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    select.clear_cache()
    model, _ = load(gemma2[1])
    sel = model.selections["cpu"]
    assert sel.name == "eager"
    assert "cannot soft-cap attention scores" in sel.decision("sdpa").reason and sel.decision("sdpa").status == "skipped"
    assert load(gemma3[1])[0].selections["cpu"].name == "sdpa"
    report = doctor.collect(model_path=str(gemma2[1]))
    cpu = next(a for a in report["attention"] if a["device"] == "cpu")
    row = next(r for r in cpu["log"] if r["name"] == "sdpa")
    assert cpu["chosen"] == "eager" and row["status"] == "skipped" and "soft-cap" in row["reason"]
    assert "soft-cap" in doctor.render(report)
    select.clear_cache()


@pytest.mark.parametrize("which", ["gemma2", "gemma3_hd256"])
def test_triton_rung_and_ops_paged_steps_match_transformers(which, tmp_path):
    """The Triton ops (GeGLU, norms, rope; interpreted) and the triton rung (soft-capped scores, per-layer
    windows, head_dim 256), prefilled together and decoded a token at a time through a paged cache."""
    pytest.importorskip("triton")
    from lowgear.attention.metadata import build_metadata
    from lowgear.attention.select import get_backend
    from lowgear.ops import dispatch

    hf = write_gemma(tmp_path / which, **MODELS[which])
    model, cache = load(tmp_path / which, max_seq_len=64, page_size=4)
    use_ops(model, dispatch.triton_ops())
    triton_rung = get_backend("triton")
    model.backend_for = lambda device, is_decode=False: triton_rung
    seqs, tables, done = [ids_of(13, 5), ids_of(11, 6)], [[2, 0, 3, 6], [1, 4, 5]], [0, 0]
    want = [hf_logits(hf, s) for s in seqs]
    with interpreter_index_shim():
        for q_lens in ([9, 5], [1, 1], [1, 1], [1, 0]):  # the first prompt past the window of 8
            live = [i for i, n in enumerate(q_lens) if n]
            kv_lens = [done[i] + q_lens[i] for i in live]
            meta = build_metadata([q_lens[i] for i in live], kv_lens, [tables[i] for i in live], 4, logits="all")
            ids = torch.tensor([t for i in live for t in seqs[i][done[i]:done[i] + q_lens[i]]])
            expect = torch.cat([want[i][done[i]:done[i] + q_lens[i]] for i in live])
            torch.testing.assert_close(model.forward(ids, meta, cache).cpu(), expect, atol=ATOL, rtol=RTOL)
            for i in live:
                done[i] += q_lens[i]


# ------------------------------------------------------------------ bad files say what is wrong


def test_gguf_missing_post_ffw_norm_names_the_tensor(gemma2, tmp_path):
    path = write_gemma_gguf(tmp_path / "bad.gguf", gemma2[0], drop=("blk.2.post_ffw_norm.weight",))
    with pytest.raises(ModelFormatError, match=r"layer 2 has no post_ffn_norm .*blk\.2\.post_ffw_norm\.weight.*gemma2 needs") as e:
        lg.Config(path)
    assert "\n" not in str(e.value)


def test_gguf_missing_q_norm_names_the_tensor(gemma3, tmp_path):
    path = write_gemma_gguf(tmp_path / "bad3.gguf", gemma3[0], drop=("blk.0.attn_q_norm.weight",))
    with pytest.raises(ModelFormatError, match=r"layer 0 has no q_norm .*blk\.0\.attn_q_norm\.weight.*gemma3 needs"):
        lg.Config(path)


# ------------------------------------------------------------------ Gemma's tokenizer, both ways


def test_gemma_style_tokenizer_from_tokenizer_json_and_from_gguf(tmp_path):
    """Gemma's tokenizer is SentencePiece BPE with byte fallback and no space prefix: in a folder a
    tokenizer.json (a Replace(" ", "▁") normalizer, no pre-tokenizer), in llama.cpp's GGUF the "llama"
    vocabulary with add_space_prefix false. Both, read by lowgear, cut text as transformers' tokenizer
    from that tokenizer.json does, and give the text back."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    from lowgear.tokenizer import gguf_vocab as gv
    from test_tokenizer import SPM_TEXTS, spm_vocab, write_vocab_gguf

    tokens, types, scores = spm_vocab()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=gv.derive_merges(tokens, scores, types),
                     unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    tj = HFTokenizer(bpe)
    tj.normalizer = normalizers.Replace(" ", "▁")
    tj.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tj.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder = tmp_path / "tok"
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tj, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(folder)
    path = write_vocab_gguf(tmp_path / "gemma-vocab.gguf", "llama", tokens, types, scores, add_space_prefix=False,
                            bos_token_id=1, eos_token_id=2, unk_token_id=0)
    from_folder, from_gguf = lg.Tokenizer(str(folder)), lg.Tokenizer(path)
    for text in SPM_TEXTS + [" leading space", "hello  world "]:
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert from_folder.encode_ids(text) == want, text
        assert from_gguf.encode_ids(text) == want, text
        assert from_folder.decode(want) == text and from_gguf.decode(want) == text, text
