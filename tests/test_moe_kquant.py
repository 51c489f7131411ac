"""The expert GEMV (ops/matmul/moe_gemv.py) on the GGUF block types of the K-quant files (Q2_K .. Q6_K mixes).

Stacks of E experts are built from blocks made by gguf-py's own quantizer where it has one (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0) and from random bits with sane f16 scales where it has none (the K types); the reference
is gguf-py's `dequantize` of the same bytes and a float64 matmul, so the bit layouts are checked against
an outside reader. Routing repeats an expert, skips others (whose bytes are NaN: the kernel must not
read them) and uses rows of K not a multiple of 256 where the block size allows. The end-to-end test
decodes a tiny random Qwen3-MoE GGUF with Q4_K gate|up and Q6_K down experts (Q4_K_M's mix) through the
kernel hook and through the grouped torch path. Runs in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import all_logits, greedy_together, interpreter_index_shim, load

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from lowgear.bench.synthetic.common import random_blocks  # noqa: E402
from lowgear.formats.blocks import get_format  # noqa: E402
from lowgear.formats.spec import PackedTensor  # noqa: E402
from lowgear.model.moe import ExpertLinear  # noqa: E402
from lowgear.ops.matmul import moe_gemv  # noqa: E402

E, N = 5, 12  # 12 output rows: the second program of 8 rows is partly past the end
IDS = [3, 0, 3, 4, 3, 1]  # expert 3 three times, expert 2 never
QUANTIZED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # gguf-py quantizes these; the K types get random blocks
# (type, K): K of 160 is 5 blocks of 32 (one block a step), 256 is 8 (eight a step), 512 two super-blocks
CASES = [(q, k) for q in QUANTIZED for k in (160, 256)] + [(q, 512) for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def stack_of(qtype: str, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 blocks [E, N, row_bytes], float64 weights [E, N, K] as gguf-py dequantizes them)."""
    rng = np.random.default_rng(seed)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in QUANTIZED:
        raw = gguf.quants.quantize(rng.standard_normal((E * N, k)).astype(np.float32), kind)
    else:
        raw = random_blocks(rng, qtype, E * N, k, std=1.0)
    ref = gguf.quants.dequantize(raw, kind).astype(np.float64)
    return raw.reshape(E, N, -1), ref.reshape(E, N, k)


def expert_stack(qtype: str, raw: np.ndarray) -> ExpertLinear:
    k = raw.shape[-1] // get_format(qtype).block_bytes * get_format(qtype).block_size
    data = torch.from_numpy(raw.reshape(E * N, -1).copy())
    return ExpertLinear([PackedTensor(qtype, data, (E * N, k))], E)


@pytest.mark.parametrize("x_div", [1, 2])
@pytest.mark.parametrize("qtype,k", CASES)
def test_expert_gemv_matches_gguf_dequantize(qtype, k, x_div):
    raw, w = stack_of(qtype, k, seed=k + x_div)
    unused = [e for e in range(E) if e not in IDS]
    raw[unused] = 0xFF  # f16 0xFFFF is NaN: a read of an unchosen expert shows in the output
    stack = expert_stack(qtype, raw)
    assert moe_gemv.supports(stack) and stack.qtype == qtype
    ids = torch.tensor(IDS)
    x = torch.randn(len(IDS) // x_div, k, generator=torch.Generator().manual_seed(k))
    y = moe_gemv.moe_gemv(x, ids, stack, x_div)
    want = np.stack([x[r // x_div].double().numpy() @ w[e].T for r, e in enumerate(IDS)])
    assert y.shape == (len(IDS), N) and y.dtype == torch.float32
    # float32 sums of K products against float64: measured at most 4e-7 of the largest output
    err = np.abs(y.double().numpy() - want).max() / np.abs(want).max()
    assert err < 1e-5, err


def test_half_activations():
    """float16 activations (a CUDA model's hidden state) are read and widened, not reinterpreted."""
    raw, w = stack_of("Q4_K", 256, seed=5)
    ids = torch.tensor([1, 1, 4])
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6)).half()
    y = moe_gemv.moe_gemv(x, ids, expert_stack("Q4_K", raw), 1)
    want = np.stack([x[r].double().numpy() @ w[e].T for r, e in enumerate(ids.tolist())])
    assert np.abs(y.double().numpy() - want).max() / np.abs(want).max() < 1e-5


def test_which_stacks_the_kernel_takes():
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q4_1", "Q4_0", "Q8_0"):
        assert moe_gemv.supports(expert_stack(qtype, stack_of(qtype, 256)[0]))
    for qtype in ("IQ4_XS", "IQ4_NL"):  # no block_dot for these (a level table): the grouped torch path
        assert not moe_gemv.supports(expert_stack(qtype, random_blocks(np.random.default_rng(0), qtype, E * N, 256)))


# ------------------------------------------------------------------ a Q4_K_M-style model, end to end


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    """A tiny random qwen3_moe GGUF whose experts are Q4_K (gate, up) and Q6_K (down), as a Q4_K_M file has them."""
    from test_model_moe import write_moe, write_moe_gguf

    folder = tmp_path_factory.mktemp("q4km")
    hf = write_moe(folder / "hf", "qwen3_moe", hidden_size=256, moe_intermediate_size=256, num_experts=8,
                   num_experts_per_tok=2, num_hidden_layers=2, mlp_only_layers=[], head_dim=32,
                   num_attention_heads=4, num_key_value_heads=2)
    return write_moe_gguf(folder / "q4km.gguf", hf, ("Q4_K", "Q6_K"))


def test_q4_k_m_model_decodes_alike_on_kernel_and_grouped_path(q4_k_m, monkeypatch):
    kernel_model, kernel_cache = load(q4_k_m, cpu_weights="packed")
    layers = [layer.mlp for layer in kernel_model.layers]
    assert [(m.gate_up.qtype, m.down.qtype) for m in layers] == [("Q4_K", "Q6_K")] * 2
    for m in layers:
        assert moe_gemv.moe_kernel_for(m) is moe_gemv.moe_step
        m.kernel = moe_gemv.moe_step  # the hook a CUDA load attaches; the rest of the model stays on torch ops
    grouped_model, grouped_cache = load(q4_k_m, cpu_weights="packed")
    assert all(layer.mlp.kernel is None for layer in grouped_model.layers)
    # 64 output rows a program instead of 8: a program costs the interpreter about the same at either size,
    # so this is 8x fewer of them; the 8-row launch is what the tests above run
    monkeypatch.setattr(moe_gemv, "UNION_MIN_SHARED", 2.0)  # the per-row mode at every step (test_moe_union: the other)
    params = moe_gemv.launch_params
    monkeypatch.setattr(moe_gemv, "launch_params", lambda q, n, k: {**params(q, n, k), "BLOCK_N": 64})
    calls = []
    gemv = moe_gemv.moe_gemv
    monkeypatch.setattr(moe_gemv, "moe_gemv", lambda *a, **kw: calls.append(a[2].qtype) or gemv(*a, **kw))
    ids = [5, 77, 130, 9]  # 4 tokens x top-2: 8 (token, expert) rows, within GEMV_ROWS
    got = all_logits(kernel_model, kernel_cache, ids)
    assert calls == ["Q4_K", "Q6_K"] * 2  # gate|up and down of both layers went through the kernel
    tokens = greedy_together(kernel_model, kernel_cache, [ids], n=4)
    want = all_logits(grouped_model, grouped_cache, ids)
    # float32 on both sides, same bytes, same routing: only the summation order differs (measured 4e-7
    # of logits of |x| < 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert tokens == greedy_together(grouped_model, grouped_cache, [ids], n=4)


def test_q4_k_m_step_reads_the_chosen_experts_stored_bytes(q4_k_m):
    """The kernel reads blocks as stored, so a step's bytes are the GGUF's own tensor sizes (gguf-py's reader):
    the router and each distinct chosen expert's share of the three stacks."""
    model, _ = load(q4_k_m, cpu_weights="packed")
    layer = model.layers[1].mlp
    stored = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(q4_k_m).tensors}
    expert = sum(stored[f"blk.1.ffn_{p}_exps.weight"] for p in ("gate", "up", "down")) // layer.num_experts
    ids = torch.tensor([[2, 5], [5, 7]])  # three distinct experts
    assert layer.bytes_read(ids) == stored["blk.1.ffn_gate_inp.weight"] + 3 * expert
