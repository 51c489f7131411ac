"""On a CUDA GPU: the compiled MoE GEMV (ops/matmul/moe_gemv.py) against the grouped torch path for every
format it reads, and a graphed decode of a MoE model against eager steps. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import lowgear as lg

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """A qwen3_moe-shaped random model as GGUFs whose experts are F32, Q8_0 and Q4_0 (test_model_moe's writer), and
    the K-quant files' mixes: Q4_K_M (gate|up Q4_K, down Q6_K), Q5_K_M (Q5_K, Q6_K), Q3_K_M (Q3_K, Q5_K), Q2_K
    (Q2_K, Q3_K), and Q5_0 / Q5_1 / Q4_1 stacks."""
    import transformers

    from test_model_moe import write_moe, write_moe_gguf

    folder = tmp_path_factory.mktemp("moe_gpu")
    hf = write_moe(folder / "hf", "qwen3_moe", hidden_size=512, moe_intermediate_size=256, num_experts=32,
                   num_experts_per_tok=4, intermediate_size=512, num_hidden_layers=2, mlp_only_layers=[], head_dim=64,
                   num_attention_heads=8, num_key_value_heads=2)
    assert isinstance(hf, transformers.Qwen3MoeForCausalLM)
    files = {q: write_moe_gguf(folder / f"{q}.gguf", hf, q) for q in ("F32", "Q8_0", "Q4_0")}
    for name, types in (("Q4_K_M", ("Q4_K", "Q6_K")), ("Q5_K_M", ("Q5_K", "Q6_K")), ("Q3_K_M", ("Q3_K", "Q5_K")),
                        ("Q2_K", ("Q2_K", "Q3_K")), ("Q5_0", ("Q5_0", "Q5_1")),
                        ("Q4_1", ("Q4_1", "Q4_1"))):
        files[name] = write_moe_gguf(folder / f"{name}.gguf", hf, types)
    return files


def _load(path, dtype="float16", max_seq_len=512):
    config = lg.Config(path)
    config.devices, config.dtype, config.attn_backend = ["0"], dtype, "triton"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=16)
    model.load_autosplit(cache)
    return model, cache


# the kernel's modes forced (ops/matmul/moe_gemv.py): per row everywhere, union everywhere (batch 1 too),
# union with K split as far as it goes (one K step a split)
MODES = {"rows": {"UNION_MIN_SHARED": 2.0}, "union": {"UNION_MIN_SHARED": 0.0},
         "union_split": {"UNION_MIN_SHARED": 0.0, "TARGET_PROGRAMS": 1 << 30, "MIN_SPLIT_STEPS": 1}}


def _force(monkeypatch, mode):
    from lowgear.ops.matmul import moe_gemv

    for name, value in MODES[mode].items():
        monkeypatch.setattr(moe_gemv, name, value)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("qtype,dtype", [("F32", "float16"), ("F32", "bfloat16"), ("Q8_0", "float16"), ("Q4_0", "float16"),
                                         ("Q4_K_M", "float16"), ("Q4_K_M", "bfloat16"), ("Q5_K_M", "float16"),
                                         ("Q3_K_M", "float16"), ("Q2_K", "float16"), ("Q5_0", "float16"),
                                         ("Q4_1", "float16")])
def test_compiled_kernel_matches_grouped_path(moe_files, qtype, dtype, mode, monkeypatch):
    from lowgear.ops import dispatch
    from lowgear.ops.matmul import moe_gemv

    _force(monkeypatch, mode)

    model, _ = _load(moe_files[qtype], dtype)
    layer = model.layers[0].mlp
    assert layer.kernel is moe_gemv.moe_step
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (1, 4, 16):
        x = torch.randn(t, 512, device="cuda", generator=g).to(model.dtype)
        weights, ids = layer.route(x)
        want = layer.grouped(x.float(), weights, ids, dispatch.torch_ops())
        got = moe_gemv.moe_step(x, weights, ids, layer, model.layer_ops[0]).float()
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M"])
def test_graphed_decode_equals_eager(moe_files, qtype, mode, monkeypatch):
    _force(monkeypatch, mode)  # the union mode's sort and searchsorted, and the split's counters, captured too
    model, cache = _load(moe_files[qtype])
    from lowgear.engine.graphs import disabled_reason

    assert disabled_reason(model, True) is None
    prompts = [torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 33)]
    outs = []
    for graphs in (False, True):
        gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(model.config), max_batch_size=4,
                                  cuda_graphs=graphs)
        jobs = [lg.DynamicJob(p, max_new_tokens=12, gen_settings=lg.Sampler.Settings.greedy()) for p in prompts]
        gen.enqueue(jobs)
        while gen.num_remaining_jobs():
            gen.iterate()
        outs.append([j.generated for j in jobs])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("mode", ["rows", "union"])
@pytest.mark.parametrize("qtype", ["F32", "Q4_K_M"])
@pytest.mark.parametrize("n", [3, 45])  # a decode-sized step (the expert kernel) and a prefill-sized one
def test_fp16_matches_cpu_float32(moe_files, qtype, mode, n, monkeypatch):
    """The GPU in float16 (triton rung, the expert kernel in each mode) against the CPU float32 eager path on
    the same file: the issue's 'fp16 vs CPU float32 agreement on a smaller shape'."""
    from helpers import all_logits, load

    _force(monkeypatch, mode)
    ids = torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    ref_model, ref_cache = load(moe_files[qtype], devices=["cpu"], dtype="float32", attn_backend="eager")
    ref = all_logits(ref_model, ref_cache, ids).float()
    model, cache = _load(moe_files[qtype])
    out = all_logits(model, cache, ids).float().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, (qtype, mode, n, rel)  # fp16 activations: ~1e-3; a wrong expert or weight is O(1)
