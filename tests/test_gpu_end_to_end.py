"""On a CUDA GPU: the whole model in float16 on each GPU rung against the CPU float32 eager path on
the same weights, the generator's batching there, and what the ladder decided. Skipped without CUDA;
run on an H100 (benchmarks/run_gpu_checks.sh runs them)."""

from __future__ import annotations

import pytest
import torch

import lowgear as lg
from helpers import all_logits

pytestmark = pytest.mark.gpu

GPU_RUNGS = ["sdpa", "triton", "eager"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    root = tmp_path_factory.mktemp("gpu")
    shape = dict(arch="llama", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1024)
    return {q: write_gguf(root / f"m-{q}.gguf", qtype=q, seed=11, **shape) for q in ("Q4_0", "Q4_K", "F16")}


def _load(path, device, dtype, rung, page_size=16, max_seq_len=4096):
    config = lg.Config(path)
    config.devices, config.dtype, config.attn_backend = [device], dtype, rung
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=page_size)
    model.load_autosplit(cache)
    return model, cache


def _ids(n, seed):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "F16"])
@pytest.mark.parametrize("rung", GPU_RUNGS)
def test_fp16_rung_matches_cpu_eager(files, qtype, rung):
    ref_model, ref_cache = _load(files[qtype], "cpu", "float32", "eager")
    model, cache = _load(files[qtype], "0", "float16", rung)
    assert model.selections["cuda:0"].backend.name == rung
    for n, seed in ((1, 0), (37, 1), (300, 2)):
        ids = _ids(n, seed)
        ref = all_logits(ref_model, ref_cache, ids)
        out = all_logits(model, cache, ids).cpu()
        rel = ((out - ref).norm() / ref.norm()).item()
        # fp16 weights/activations with fp32 accumulation: ~1e-3 relative; a wrong mask or page is O(1).
        assert rel < 1e-2, (rung, qtype, n, rel)


@pytest.mark.parametrize("rung", ["sdpa", "triton"])
def test_generator_batch_equals_alone_fp16(files, rung):
    model, cache = _load(files["Q4_0"], "0", "float16", rung, page_size=256, max_seq_len=16384)
    tok = lg.Tokenizer(model.config)
    prompts = [_ids(n, 10 + i) for i, n in enumerate((5, 300, 17, 513, 1, 64, 255, 256))]

    def run(gen, batch):
        jobs = [lg.DynamicJob(p, max_new_tokens=24, gen_settings=lg.Sampler.Settings.greedy()) for p in batch]
        gen.enqueue(jobs)
        while not all(j.finished for j in jobs):
            gen.iterate()
        return [j.generated for j in jobs]

    alone = [run(lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=1), [p])[0] for p in prompts]
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tok, max_batch_size=8, max_chunk_size=256)
    together = run(gen, prompts)
    assert gen.pool.num_used == 0
    same = sum(a == b for a, b in zip(alone, together))
    print(f"{rung}: {same}/{len(prompts)} prompts token-identical batched vs alone")
    # Batched steps run other kernels than single ones (M rows through the GEMV, tl.dot or cuBLAS,
    # other prefill chunks), so float16 sums differ in the last bits and a greedy pick between two
    # near-equal logits may go either way. Where the runs part, the step must be such a near tie:
    # teacher-forced logits with a top-2 gap under 1% of the largest logit (a wrong page, mask or
    # row would move logits by O(1) and give clear winners).
    for prompt, a, b in zip(prompts, alone, together):
        if a == b:
            continue
        p = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        logits = all_logits(model, cache, prompt + a[:p])[-1].float()
        top = logits.topk(2).values
        gap = float(top[0] - top[1])
        print(f"  parted at token {p}: top-2 gap {gap:.4f}, largest |logit| {float(logits.abs().max()):.2f}")
        assert gap < 0.01 * float(logits.abs().max()), (len(prompt), p, gap)
        assert {a[p], b[p]} <= set(logits.topk(2).indices.tolist())


def test_ladder_decisions_on_this_gpu(files):
    from lowgear.attention.select import select_backend
    from lowgear.platform.hardware import resolve_devices

    device = resolve_devices(["0"])[0]
    sel = select_backend(device, lg.Config().effective_switches(), torch.float16)
    log = {d.name: (d.status, d.reason) for d in sel.log}
    print("\n".join(f"{k:10s} {v[0]:12s} {v[1]}" for k, v in log.items()))
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        assert log["flash_attn"] == ("unavailable", "flash_attn is not installed") or log["flash_attn"][0] == "unavailable"
    # whatever sits above it, a working sdpa means the chosen rung is sdpa or better
    assert sel.backend.name in ("flash_attn", "xformers", "sdpa")


GGUF_TYPES = ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_every_gguf_type_graphed_gives_the_torch_paths_tokens(tmp_path, monkeypatch, qtype):
    """Each GGUF type, graphed on the default path (triton rung, GPTQ-form or block kernels, CUDA graphs),
    in float16, gives the greedy tokens of the eager torch path (torch ops and dequantization, eager
    attention, no graphs) on the same GPU: logits close at the prompt, the 16 tokens equal up to a near-tie
    (where they part, the torch path's own logits put the two tokens within float16's noise: a random
    model's logits are flat, and the two paths sum in different orders)."""
    from lowgear.bench.synthetic import write_gguf
    from lowgear.model import load as model_load
    from lowgear.ops import dispatch

    path = write_gguf(tmp_path / f"m-{qtype}.gguf", arch="llama", hidden_size=512, num_layers=3, num_heads=8,
                      num_kv_heads=2, intermediate_size=1024, qtype=qtype, seed=21, std=0.08)
    prompt = _ids(23, 5)
    runs, logits = {}, {}
    for name in ("torch", "default"):
        with monkeypatch.context() as mp:
            if name == "torch":
                mp.setattr(model_load, "ops_for", lambda info: dispatch.torch_ops())
            model, cache = _load(path, "0", "float16", "eager" if name == "torch" else "triton", max_seq_len=1024)
            logits[name] = all_logits(model, cache, prompt).float().cpu()
            gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(model.config),
                                      cuda_graphs=name == "default")
            assert (gen.graphs is not None) == (name == "default"), gen.graphs_off_reason
            job = lg.DynamicJob(input_ids=prompt, max_new_tokens=16, gen_settings=lg.Sampler.Settings.greedy())
            gen.enqueue(job)
            while gen.num_remaining_jobs():
                gen.iterate()
            runs[name] = job.generated
            if name == "torch":
                ref_model = (model, cache)
            del gen, model, cache
    ref = logits["torch"]
    assert ((logits["default"] - ref).norm() / ref.norm()).item() < 1e-2
    ours, want = runs["default"], runs["torch"]
    assert len(ours) == len(want) == 16
    j = next((i for i, (a, b) in enumerate(zip(ours, want)) if a != b), None)
    if j is not None:
        at = all_logits(*ref_model, prompt + want[:j])[-1].float()
        assert (at[want[j]] - at[ours[j]]).item() < 2e-2 * at.abs().max().item(), (qtype, j, want[j], ours[j])
