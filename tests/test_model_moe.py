"""Mixture-of-experts models (mixtral, qwen3_moe) against Hugging Face transformers.

The references are transformers' own MixtralForCausalLM and Qwen3MoeForCausalLM on tiny random models
they write themselves (per-expert safetensors names), and llama.cpp's GGUF layout written with the
`gguf` package (experts stacked in `blk.N.ffn_{gate,up,down}_exps`, the router `ffn_gate_inp`,
Mixtral as architecture `llama` with `llama.expert_count`, Qwen3-MoE as `qwen3moe`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lowgear as lg
from helpers import all_logits, close_gguf, gguf_writer_for, greedy_together, hf_greedy, hf_logits, interpreter_index_shim, load, use_ops

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
MIXTRAL = dict(COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
# three layers: layer 1 dense (mlp_only_layers), so both kinds of layer meet in one model
QWEN3_MOE = dict(COMMON, num_hidden_layers=3, intermediate_size=112, moe_intermediate_size=32, num_experts=16,
                 num_experts_per_tok=4, head_dim=24, norm_topk_prob=True, mlp_only_layers=[1], rope_theta=1e6)
# float32 on both sides, same weights, same routing: only summation order differs (the experts' sum is
# accumulated in float32 here, in the hidden dtype in expert order in transformers). Measured: 0 (mixtral),
# 2.1e-7 (qwen3_moe), 1.5e-7 (qwen2_moe) on logits of |x| < 0.7, so 2e-4 is ~1000x headroom; planted by
# hand and seen to fail: renormalisation flipped (5e-3 qwen3_moe, 5e-2 mixtral), one expert too many
# (5e-3, 3e-2), gate and up swapped (1e-2, 3e-2), each 17x and more past the tolerance.
QWEN2_MOE = dict(COMMON, intermediate_size=112, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, rope_theta=1e6)
ATOL, RTOL = 2e-4, 1e-4


def _perturb_norms(hf, scale: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + scale * torch.randn_like(p))


def write_moe(folder, arch: str, edit=None, **overrides):
    """transformers' tiny random mixtral / qwen3_moe as a float32 folder with a byte tokenizer beside it;
    `edit(hf)` may change weights before it is saved."""
    from lowgear.bench.synthetic import byte_vocab, write_hf_tokenizer

    torch.manual_seed(0)
    if arch == "mixtral":
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{**MIXTRAL, **overrides}))
    elif arch == "qwen2_moe":
        hf = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**{**QWEN2_MOE, **overrides}))
    else:
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**QWEN3_MOE, **overrides}))
    hf.eval()
    _perturb_norms(hf)
    with torch.no_grad():  # a router of std 0.02 makes near-uniform probabilities; spread them so routing matters
        for name, p in hf.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20)
        if edit is not None:
            edit(hf)
    hf.save_pretrained(folder, safe_serialization=True)
    write_hf_tokenizer(folder, byte_vocab(VOCAB))
    return hf


def experts_of(hf, i: int):
    """(gate_up [E, 2I, H], down [E, H, I], router [E, H]) of layer i, or None for a dense layer."""
    layer = hf.model.layers[i]
    block = getattr(layer, "block_sparse_moe", None) or layer.mlp
    if not hasattr(block, "experts"):
        return None
    return block.experts.gate_up_proj, block.experts.down_proj, block.gate.weight


_GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
               "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp"}


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's q/k row permutation for llama-architecture GGUFs (RoPE on adjacent pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_moe_gguf(path, hf, qtype: str | tuple[str, str] = "F32") -> str:
    """`hf`'s weights as llama.cpp's convert_hf_to_gguf.py lays them out; experts in `qtype`, or gate and up in
    qtype[0] and down in qtype[1]. A type gguf-py cannot quantize (the K types) gets random blocks of the
    weights' spread (bench.synthetic's random_blocks), so such a file matches `hf` in shape, not in values."""
    from lowgear.bench.synthetic.common import random_blocks

    gate_up_type, down_type = (qtype, qtype) if isinstance(qtype, str) else qtype
    rng = np.random.default_rng(0)
    cfg = hf.config
    mixtral = cfg.model_type == "mixtral"
    arch = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[cfg.model_type]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf_writer_for(path, arch, cfg, head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    experts = cfg.num_local_experts if mixtral else cfg.num_experts
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    from lowgear.bench.synthetic import byte_vocab, write_gguf_tokenizer

    write_gguf_tokenizer(w, byte_vocab(VOCAB))  # the folder's tokenizer, as GGUF metadata (gpt2-style, byte-level)
    if not mixtral:
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_norm(bool(cfg.norm_topk_prob))
    if cfg.model_type == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    def add(name, t, q="F32"):
        t = t.detach().float().numpy().astype(np.float32)
        if q == "F32":
            w.add_tensor(name, t)
        else:
            kind = getattr(gguf.GGMLQuantizationType, q)
            try:
                data = gguf.quantize(t, kind)
            except NotImplementedError:
                rows = random_blocks(rng, q, int(np.prod(t.shape[:-1])), t.shape[-1], std=float(t.std()))
                data = rows.reshape(*t.shape[:-1], -1)
            w.add_tensor(name, data, raw_dtype=kind)

    add("token_embd.weight", hf.model.embed_tokens.weight)
    add("output_norm.weight", hf.model.norm.weight)
    add("output.weight", hf.lm_head.weight)
    for i, layer in enumerate(hf.model.layers):
        for name, p in layer.named_parameters():
            base, _, kind = name.rpartition(".")
            if base in _GGUF_LAYER:
                t = p
                if mixtral and base in ("self_attn.q_proj", "self_attn.k_proj"):
                    t = _permute(p, cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads)
                add(f"blk.{i}.{_GGUF_LAYER[base]}.{kind}", t)
            elif base == "mlp.shared_expert_gate":  # llama.cpp keeps it as a [hidden] vector
                add(f"blk.{i}.ffn_gate_inp_shexp.weight", p.reshape(-1))
        moe = experts_of(hf, i)
        if moe is not None:
            gate_up, down, router = moe
            inter = gate_up.shape[1] // 2
            add(f"blk.{i}.ffn_gate_inp.weight", router)
            add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter], gate_up_type)
            add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:], gate_up_type)
            add(f"blk.{i}.ffn_down_exps.weight", down, down_type)
    return close_gguf(w, path)


def ids_of(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return write_moe(folder, request.param), folder


def test_spec_reads_the_experts(moe):
    hf, folder = moe
    spec = lg.Config(str(folder)).spec
    if spec.arch == "mixtral":
        assert (spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size) == (8, 2, 96)
        assert spec.norm_topk_prob and spec.moe_layers == (0, 1) and not spec.qk_norm
    else:
        assert (spec.arch, spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size) == ("qwen3_moe", 16, 4, 32)
        assert spec.norm_topk_prob and spec.moe_layers == (0, 2) and spec.qk_norm  # layer 1: mlp_only_layers


def test_logits_match_transformers(moe):
    hf, folder = moe
    model, cache = load(folder)
    ids = ids_of(37)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_greedy_32_tokens_match_transformers(moe):
    hf, folder = moe
    prompts = [ids_of(n, seed=10 + k) for k, n in enumerate((11, 5, 23))]
    assert greedy_together(*load(folder), prompts) == [hf_greedy(hf, p) for p in prompts]


def test_gguf_gives_the_folders_logits(moe, tmp_path):
    hf, folder = moe
    path = write_moe_gguf(tmp_path / "moe.gguf", hf)
    spec, folder_spec = lg.Config(path).spec, lg.Config(str(folder)).spec
    assert (spec.arch, spec.num_experts, spec.num_experts_per_tok, spec.moe_layers, spec.norm_topk_prob) == \
        (folder_spec.arch, folder_spec.num_experts, folder_spec.num_experts_per_tok, folder_spec.moe_layers, True)
    ids = ids_of(29, seed=4)
    model, cache = load(path)
    assert model.layers[0].mlp.gate_up.weight.shape[0] == spec.num_experts  # one stacked tensor
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_qwen2_moe_shared_expert_matches_transformers(tmp_path):
    """qwen2_moe: q/k/v biases, top-k not renormalised, and a shared expert scaled by sigmoid(gate . x); the
    folder and its GGUF (`qwen2moe`, `ffn_*_shexp`, `ffn_gate_inp_shexp` as a [hidden] vector) against transformers."""
    hf = write_moe(tmp_path / "q2", "qwen2_moe")
    spec = lg.Config(str(tmp_path / "q2")).spec
    assert (spec.shared_expert_intermediate_size, spec.norm_topk_prob, spec.attention_bias) == (48, False, True)
    ids = ids_of(23, seed=9)
    want = hf_logits(hf, ids)
    torch.testing.assert_close(all_logits(*load(tmp_path / "q2"), ids), want, atol=ATOL, rtol=RTOL)
    path = write_moe_gguf(tmp_path / "q2.gguf", hf)
    assert lg.Config(path).spec.shared_expert_intermediate_size == 48
    torch.testing.assert_close(all_logits(*load(path), ids), want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ the kernel path against the torch path


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0"])
def test_kernel_path_matches_grouped_path(moe, tmp_path, qtype):
    """The Triton GEMV over chosen experts (interpreted) against the grouped torch path, per step kind:
    a 1-token decode, a 3-row decode and a prefill; experts held packed (cpu_weights=packed)."""
    pytest.importorskip("triton")
    from lowgear.ops import dispatch
    from lowgear.ops.matmul import moe_gemv

    hf, _ = moe
    path = write_moe_gguf(tmp_path / f"moe-{qtype}.gguf", hf, qtype)
    model, cache = load(path, cpu_weights="packed")
    moe_layer = model.layers[0].mlp
    assert moe_layer.gate_up.qtype == qtype and moe_layer.gate_up.packed == (qtype != "F32")
    torch.manual_seed(3)
    with interpreter_index_shim():
        k = moe_layer.top_k
        for t in (1, 3, moe_gemv.GEMV_ROWS // k + 1):
            x = torch.randn(t, hf.config.hidden_size)
            weights, ids = moe_layer.route(x)
            want = moe_layer.grouped(x, weights, ids, dispatch.torch_ops())
            got = moe_gemv.moe_step(x, weights, ids, moe_layer, dispatch.torch_ops())
            if t * k > moe_gemv.GEMV_ROWS:  # a prefill-sized step is left to the grouped path
                assert got is None
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if qtype != "Q4_0":
            return
        use_ops(model, dispatch.triton_ops())  # the whole model on the Triton ops: one 4-bit form is enough
        assert moe_layer.kernel is moe_gemv.moe_step
        ids = ids_of(5, seed=8)
        model_gguf_ref, cache_ref = load(path, cpu_weights="packed")
        torch.testing.assert_close(all_logits(model, cache, ids), all_logits(model_gguf_ref, cache_ref, ids),
                                   atol=2e-4, rtol=1e-4)


def test_decode_reads_only_the_chosen_experts(moe, tmp_path):
    """A batch-1 step through the kernel loads rows of the k chosen experts only: experts no token chose
    hold NaN, and the output stays finite and equal to the grouped path's."""
    pytest.importorskip("triton")
    from lowgear.ops import dispatch
    from lowgear.ops.matmul import moe_gemv

    hf, folder = moe
    model, _ = load(folder)
    layer = model.layers[0].mlp
    x = torch.randn(1, hf.config.hidden_size, generator=torch.Generator().manual_seed(2))
    weights, ids = layer.route(x)
    want = layer.grouped(x, weights, ids, dispatch.torch_ops())
    unused = [e for e in range(layer.num_experts) if e not in ids.tolist()[0]]
    with torch.no_grad():
        layer.gate_up.weight[unused] = float("nan")
        layer.down.weight[unused] = float("nan")
    with interpreter_index_shim():
        got = moe_gemv.moe_step(x, weights, ids, layer, dispatch.torch_ops())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.bytes_read(ids) == layer.router.nbytes + layer.top_k * (layer.gate_up.nbytes + layer.down.nbytes) // layer.num_experts


# ------------------------------------------------------------------ routing edge cases, against transformers


def _tie(hf):
    """Experts 1 and 2 of every layer get the same router row, below a dominant expert 0 (mixtral: top-2), so
    the second slot is a tie; their weights differ, so the winner shows in the logits."""
    for i in range(len(hf.model.layers)):
        moe = experts_of(hf, i)
        if moe is not None:
            router = moe[2]
            router[2] = router[1]
            router[0] = router[1] + 0.5 * router[1].abs()


def test_router_tie_picks_transformers_expert(tmp_path):
    """Equal router logits at the top-k boundary: which expert wins is torch.topk's choice, which PyTorch leaves
    unspecified (on this CPU it depends on the other values of the row: [0, 2] or [0, 1] for the same tie).
    lowgear calls torch.topk on the same float32 probabilities as transformers, so it picks the same one."""
    hf = write_moe(tmp_path / "tie", "mixtral", edit=_tie)
    model, cache = load(tmp_path / "tie")
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = model.layers[0].mlp.route(x)
    probs = torch.softmax(model.layers[0].mlp.router(x), -1)
    assert torch.equal(probs[:, 1], probs[:, 2])
    tied = [r for r, row in enumerate(ids.tolist()) if (1 in row) != (2 in row)]  # one of the pair made it
    assert tied, "no tie at the boundary: the test would prove nothing"
    with torch.no_grad():
        _, hf_weights, hf_ids = hf.model.layers[0].mlp.gate(x)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=1e-6)
    ids = ids_of(21, seed=6)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_expert_chosen_by_no_token_changes_nothing(tmp_path):
    """Experts no token of the prompt chooses (found from transformers' own router) get NaN weights: transformers'
    logits stay finite, and so must ours, equal to them (an idle expert is never read, nor multiplied by 0)."""
    from lowgear.bench.synthetic import write_hf_tokenizer, byte_vocab

    hf = write_moe(tmp_path / "clean", "qwen3_moe")
    ids = ids_of(3, seed=2)  # 3 tokens x top-4 of 16 experts: most experts idle
    chosen: dict[int, set] = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: chosen.setdefault(i, set()).update(out[2].flatten().tolist()))
             for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    hf_logits(hf, ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, used in chosen.items():
            idle = [e for e in range(hf.config.num_experts) if e not in used]
            assert idle
            hf.model.layers[i].mlp.experts.gate_up_proj[idle] = float("nan")
            hf.model.layers[i].mlp.experts.down_proj[idle] = float("nan")
    want = hf_logits(hf, ids)
    assert torch.isfinite(want).all()
    hf.save_pretrained(tmp_path / "idle", safe_serialization=True)
    write_hf_tokenizer(tmp_path / "idle", byte_vocab(VOCAB))
    ours = all_logits(*load(tmp_path / "idle"), ids)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------ batched == alone on every CPU rung


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    hf = write_moe(folder / "hf", "qwen3_moe")
    return write_moe_gguf(folder / "q3moe.gguf", hf, "Q8_0")


@pytest.fixture(scope="module")
def alone(moe_gguf):
    from test_generator import prompts, runs_alone

    return runs_alone(moe_gguf, prompts(4, lengths=(5, 17, 33, 9)))


@pytest.mark.parametrize("rung", ["eager", "sdpa", "triton"])
def test_batch_equals_alone(moe_gguf, alone, rung):
    from test_generator import run_batched

    ids, want = alone
    gen, got = run_batched(moe_gguf, rung, ids)
    assert gen.model.layers[0].mlp.num_experts == 16
    assert got == want


# ------------------------------------------------------------------ a NaN router ends its job only


def test_nan_router_ends_that_job_only(moe):
    hf, folder = moe
    model, cache = load(folder)
    poison = VOCAB - 1
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(model.config), max_batch_size=4)
    marked = {}
    lookup, router = model.embed.lookup, model.layers[0].mlp.router

    def marking_lookup(ids, dtype=None):
        marked["rows"] = ids.reshape(-1) == poison
        return lookup(ids, dtype)

    class NanRouter(torch.nn.Module):  # the router's logits of the poisoned token's rows become NaN
        def forward(self, x):
            return router(x).masked_fill(marked["rows"][:, None], float("nan"))

    model.embed.lookup = marking_lookup
    model.layers[0].mlp.router = NanRouter()
    healthy = [lg.DynamicJob(torch.tensor([ids_of(7, seed=s)]), max_new_tokens=5,
                             gen_settings=lg.Sampler.Settings.greedy()) for s in (1, 2)]
    bad = lg.DynamicJob(torch.tensor([ids_of(6, seed=3) + [poison]]), max_new_tokens=5,
                        gen_settings=lg.Sampler.Settings.greedy())
    gen.enqueue([healthy[0], bad, healthy[1]])
    results = []
    while gen.num_remaining_jobs():
        results.extend(gen.iterate())
    failed = [r for r in results if r["eos"] and r["eos_reason"] == "error"]
    assert [r["job"] for r in failed] == [bad] and "non-finite" in failed[0]["error"]
    for job, s in zip(healthy, (1, 2)):
        ids = torch.tensor([ids_of(7, seed=s)])
        assert job.generated == hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                            pad_token_id=0)[0, 7:].tolist()


# ------------------------------------------------------------------ bytes


def test_step_bytes_count_chosen_experts(moe):
    """All experts are stored (placement's per-layer bytes); a step reads the router and the distinct chosen ones."""
    from lowgear.bench.measure import step_weight_bytes
    from lowgear.platform.placement import device_bytes

    hf, folder = moe
    model, _ = load(folder)
    spec = model.spec
    per_layer, _, _ = device_bytes(model.config.source, spec, 4)
    layer = model.layers[0]
    expert = 3 * spec.moe_intermediate_size * spec.hidden_size * 4  # gate, up, down in float32
    assert layer.mlp.gate_up.nbytes + layer.mlp.down.nbytes == spec.num_experts * expert
    attn = sum(p.numel() * 4 for n, p in layer.named_parameters() if not n.startswith("mlp."))
    assert per_layer[0] == attn + spec.num_experts * expert + spec.num_experts * spec.hidden_size * 4
    ids = torch.tensor([[0, 1], [1, 0], [1, 5]])[:, : spec.num_experts_per_tok]
    assert layer.mlp.bytes_read(ids) == spec.num_experts * spec.hidden_size * 4 + len(set(ids.flatten().tolist())) * expert
    dense_all = step_weight_bytes(model, 1, all_experts=True)
    one_token = step_weight_bytes(model, 1)
    moe_layers = len(spec.moe_layers)
    assert dense_all - one_token == moe_layers * (spec.num_experts - spec.num_experts_per_tok) * expert


def test_doctor_says_what_a_step_reads(moe, tmp_path):
    """doctor: every expert stored; a batch-1 step reads the dense parts and top_k of num_experts of each stack.
    The expected figure is summed here from the GGUF's own tensor sizes (the gguf package's reader)."""
    from lowgear.cli import doctor

    hf, _ = moe
    path = write_moe_gguf(tmp_path / "d.gguf", hf, "Q8_0")
    report = doctor.collect(model_path=path, devices=["cpu"])
    spec = lg.Config(path).spec
    elt = {"float32": 4, "float16": 2, "bfloat16": 2}[report["model"]["dtype"]]
    stored = read = 0
    for t in gguf.GGUFReader(path).tensors:
        n = int(t.n_bytes)
        if t.tensor_type == gguf.GGMLQuantizationType.F32 and not t.name.endswith("norm.weight"):
            n = n // 4 * elt  # float weights are held in the model's dtype, norms in float32
        stored += n
        if t.name != "token_embd.weight":  # a step reads one row of the (untied) embedding: not counted
            read += n * spec.num_experts_per_tok // spec.num_experts if "_exps" in t.name else n
    e = report["model"]["experts"]
    assert (e["experts"], e["top_k"], e["moe_layers"]) == (spec.num_experts, spec.num_experts_per_tok, len(spec.moe_layers))
    assert report["model"]["weight_bytes"] == stored
    assert e["bytes_read_per_token"] == read
    assert "a batch-1 decode step reads" in doctor.render(report)


def test_gptq_experts_match_transformers_on_dequantized_weights(tmp_path):
    """A mixtral folder whose per-expert linears are GPTQ (4-bit, group 32): held stacked and packed, and equal
    to transformers running the dequantized weights (test_gptq's integer reference)."""
    import json

    from safetensors.torch import load_file, save_file

    from test_gptq import quantize

    hf = write_moe(tmp_path / "float", "mixtral")
    tensors = load_file(str(tmp_path / "float" / "model.safetensors"))
    inter = hf.config.intermediate_size
    out = {}
    with torch.no_grad():
        for n, (name, t) in enumerate(sorted(tensors.items())):
            if ".experts." not in name:
                out[name] = t
                continue
            parts, ref = quantize(t, 4, 32, False, False, False, n)
            out.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in parts.items()})
            layer, expert, which = int(name.split(".")[2]), int(name.split(".")[5]), name.split(".")[6]
            experts = hf.model.layers[layer].mlp.experts
            rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter)}.get(which)
            (experts.down_proj[expert] if rows is None else experts.gate_up_proj[expert, rows]).copy_(ref.float())
    folder = tmp_path / "gptq"
    folder.mkdir()
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for f in (tmp_path / "float").glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    model, cache = load(folder, cpu_weights="packed")
    stack = model.layers[0].mlp.gate_up
    assert stack.qtype == "GPTQ4g32" and stack.packed and stack.qweight.shape == (8, 64 * 4 // 32, 2 * inter)
    ids = ids_of(19, seed=3)
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=ATOL, rtol=RTOL)


def test_layers_split_over_devices_by_stored_expert_bytes(moe, tmp_path, monkeypatch):
    """Placement splits MoE layers as dense ones, each layer weighing every expert it stores (the GGUF's own
    tensor sizes, read with the gguf package)."""
    from lowgear.platform import hardware, placement

    hf, _ = moe
    path = write_moe_gguf(tmp_path / "split.gguf", hf, "Q4_0")
    source = lg.Config(path).source
    spec = source.spec
    per_layer, other, _ = placement.device_bytes(source, spec, 2)
    want = [0] * spec.num_layers
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk."):
            n = int(t.n_bytes)
            float_weight = t.tensor_type == gguf.GGMLQuantizationType.F32 and not t.name.endswith("norm.weight")
            want[int(t.name.split(".")[1])] += n // 2 if float_weight else n  # float weights held in float16
    assert per_layer == want
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4,t4")
    t4s = hardware.list_devices()[:2]
    kv = placement.kv_bytes_per_token_per_layer(spec, 2)
    reserve = 2**20
    slack = min(per_layer) // 2  # room for the embedding, one layer and its cache, not two layers
    first = reserve + other["embed"] + per_layer[0] + 64 * kv + slack
    plan = placement.plan(spec, per_layer, other, t4s, kv, 64, reserve, per_device_limit=[first, None], page_size=16)
    assert plan.layer_device == (0,) + (1,) * (spec.num_layers - 1)
    assert plan.per_device[1].weights == sum(per_layer[1:]) + other["norm"] + other["lm_head"]


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_bench_presets_and_peers_are_moe(preset):
    """`lowgear bench --preset`: random stacked experts of the architecture's shapes (packed, as a GGUF holds them),
    and a transformers peer of the same architecture; a small version runs through the loader."""
    import dataclasses

    from lowgear.bench.models import PRESETS, RandomSource, synthetic_model
    from lowgear.bench.peer import hf_config
    from lowgear.formats.validate import expected_shapes

    spec = PRESETS[preset]
    shapes = RandomSource(spec, "Q4_0", torch.device("meta"), torch.float16).shapes
    expected = expected_shapes(spec)
    assert set(shapes) <= set(expected) and all(expected[n] == shapes[n] for n in shapes)
    assert shapes["layers.0.gate_exps"] == (spec.num_experts, spec.moe_intermediate_size, spec.hidden_size)
    small = dataclasses.replace(spec, num_layers=2, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                vocab_size=VOCAB, num_heads=4, num_kv_heads=2, head_dim=16, moe_layers=(0, 1))
    peer = transformers.AutoModelForCausalLM.from_config(hf_config(small, "eager"))
    assert type(peer).__name__ == {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[spec.arch]
    assert peer.model.layers[0].mlp.experts.gate_up_proj.shape == (spec.num_experts, 64, 64)
    model, _ = synthetic_model(small, "q4_0", torch.device("cpu"), 64, 16, backend="eager", dtype=torch.float32, label="cpu")
    stack = model.layers[1].mlp.gate_up
    assert stack.num_experts == spec.num_experts and stack.out_features == 64


# ------------------------------------------------------------------ bad files say what is wrong


def test_missing_expert_names_itself(tmp_path):
    from safetensors.torch import load_file, save_file

    from lowgear.errors import ModelFormatError

    write_moe(tmp_path / "m", "mixtral")
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]  # transformers saves Mixtral's original names
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match=r"layers\.1\.up_exps needs experts 0\.\.7 .* \(missing \[5\]"):
        lg.Config(str(tmp_path / "m"))


def test_gguf_without_an_expert_stack_or_with_too_many_chosen(tmp_path):
    from lowgear.errors import ModelFormatError

    from gguf_edit import rewrite_gguf

    hf = write_moe(tmp_path / "m", "qwen3_moe")
    path = write_moe_gguf(tmp_path / "m.gguf", hf)
    no_up = rewrite_gguf(path, tmp_path / "no_up.gguf", tensors={"blk.2.ffn_up_exps.weight": None})
    with pytest.raises(ModelFormatError, match=r"layer 2 has no up_exps .*blk\.2\.ffn_up_exps\.weight"):
        lg.Config(no_up)
    greedy = rewrite_gguf(path, tmp_path / "k.gguf", meta={"qwen3moe.expert_used_count": 17})
    with pytest.raises(ModelFormatError, match=r"num_experts_per_tok is 17, .*cannot use more than the 16 experts"):
        lg.Config(greedy)
