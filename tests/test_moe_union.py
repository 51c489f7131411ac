"""The experts' GEMV in its union mode (ops/matmul/moe_gemv.py): rows grouped by expert on the device, each
chosen expert's weights read once for all its rows, outputs scattered back through the permutation; and
both modes with K split (splitk.finish).

Stacks and their float64 reference are test_moe_kquant's (gguf-py's quantizer where it has one, random
bits otherwise, gguf-py's `dequantize` as the outside reader); experts nobody chose hold NaN bytes, so a
read of one shows. Routings repeat experts, skip others, put every row on one expert (several passes of
BLOCK_T rows), and have R not a multiple of BLOCK_T. The end-to-end test decodes a batch of prompts of a
tiny random Q4_K_M-style Qwen3-MoE GGUF through the kernel hook forced onto the union mode and through
the grouped torch path. Runs in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import all_logits, greedy_together, load

gguf = pytest.importorskip("gguf")
pytest.importorskip("triton")

from test_moe_kquant import E, N, _interpreter_numpy_shim, expert_stack, q4_k_m, stack_of  # noqa: E402,F401

from lowgear.model.moe import ExpertLinear  # noqa: E402
from lowgear.ops.matmul import moe_gemv  # noqa: E402

# (flat expert ids, tokens giving BLOCK_T, x_div): top-2 of 5 tokens (gate|up's x_div), expert 3 four times, 0
# three times, 2 never, R = 10 rows against BLOCK_T = 8; then 7 rows all on expert 2 (down's x_div 1) in
# passes of 2 rows (BLOCK_T as for 2 tokens), the last pass half full
ROUTINGS = {"mixed": ([3, 0, 3, 4, 3, 1, 0, 4, 3, 0], 5, 2), "one_expert": ([2] * 7, 2, 1)}
# (type, K, split): Q4_0 at K 160 is 5 one-block steps (split 2: 3 + 2 steps), Q4_K at 512 two super-blocks,
# F16 at 600 three steps of 256, the last masked
CASES = [("Q4_0", 160, 1), ("Q4_0", 160, 2), ("Q4_K", 512, 1), ("Q4_K", 512, 2), ("Q6_K", 512, 2), ("Q8_0", 256, 1),
         ("F16", 600, 1), ("F16", 600, 2)]


def stack_for(qtype: str, k: int, unused: list[int], seed: int) -> tuple[ExpertLinear, np.ndarray]:
    """(the stack, float64 [E, N, K]), unused experts' stored values NaN."""
    if qtype == "F16":
        w = torch.randn(E, N, k, generator=torch.Generator().manual_seed(seed)).half()
        ref = w.double().numpy().copy()
        w[unused] = float("nan")
        return ExpertLinear([w], E), ref
    raw, ref = stack_of(qtype, k, seed=seed)
    raw[unused] = 0xFF  # f16 0xFFFF is NaN
    return expert_stack(qtype, raw), ref


def reference(x: torch.Tensor, ids: list[int], w: np.ndarray, x_div: int) -> np.ndarray:
    return np.stack([x[r // x_div].double().numpy() @ w[e].T for r, e in enumerate(ids)])


def close(y: torch.Tensor, want: np.ndarray) -> None:
    assert y.shape == want.shape and y.dtype == torch.float32
    # float32 sums of K products against float64, in another order per split
    err = np.abs(y.double().numpy() - want).max() / np.abs(want).max()
    assert err < 1e-5, err


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("qtype,k,split", CASES)
def test_union_read_matches_gguf_dequantize(qtype, k, split, routing):
    ids, tokens, x_div = ROUTINGS[routing]
    stack, w = stack_for(qtype, k, [e for e in range(E) if e not in ids], seed=k + split)
    x = torch.randn(len(ids) // x_div, k, generator=torch.Generator().manual_seed(k))
    groups = moe_gemv.group(torch.tensor(ids), E, tokens)
    assert groups.block_t == {"mixed": 8, "one_expert": 2}[routing]
    # the bounds by hand: how many rows chose each expert, accumulated
    counts = [ids.count(e) for e in range(E)]
    assert groups.bounds.tolist() == [sum(counts[:e]) for e in range(E + 1)]
    y = moe_gemv.union_gemv(moe_gemv.gather(x, groups, x_div), groups, stack, scatter=True, split=split)
    close(y, reference(x, ids, w, x_div))


def test_union_output_in_expert_order_feeds_the_next_launch():
    """gate|up's output stays in expert order (no scatter) and is the down launch's gathered input as it is."""
    ids, tokens, _ = ROUTINGS["mixed"]
    gate, wg = stack_for("Q4_K", 256, [2], seed=1)
    down, wd = stack_for("Q4_0", 32 * ((N + 31) // 32), [2], seed=2)  # K of down = N rows of gate, padded
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(3))
    groups = moe_gemv.group(torch.tensor(ids), E, tokens)
    order = groups.order.tolist()
    h = moe_gemv.union_gemv(moe_gemv.gather(x, groups, 2), groups, gate, scatter=False)
    assert h.shape == (len(ids) + groups.block_t - 1, N)
    close(h[:len(ids)], reference(x, ids, wg, 2)[order])  # sorted position i holds row order[i]
    hp = torch.nn.functional.pad(h, (0, down.in_features - N))
    y = moe_gemv.union_gemv(hp, groups, down, scatter=True)
    close(y, np.stack([hp[i].double().numpy() @ wd[e].T for e, i in
                       zip(ids, [order.index(r) for r in range(len(ids))])]))


@pytest.mark.parametrize("qtype,k", [("Q4_0", 160), ("Q4_K", 512), ("F16", 600)])
def test_per_row_mode_with_k_split(qtype, k):
    ids = [3, 0, 3, 4, 3, 1]
    stack, w = stack_for(qtype, k, [2], seed=7)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8))
    close(moe_gemv.moe_gemv(x, torch.tensor(ids), stack, 2, split=2), reference(x, ids, w, 2))


def test_split_rule():
    """Hand-worked launches: Mixtral's down at batch 1 (2 experts x 512 blocks of 8 rows, Q4_0 K = 14336:
    56 steps of 8 blocks) splits in 2; its gate|up (3584 blocks) and Qwen3-30B-A3B's shapes do not."""
    assert moe_gemv.split_for(2 * 512, 14336 // 32 // 8) == 2
    assert moe_gemv.split_for(2 * 3584, 4096 // 32 // 8) == 1
    assert moe_gemv.split_for(8 * 192, 2048 // 256) == 1  # Q4_K gate|up, K of 8 super-blocks: too short to split
    assert moe_gemv.split_for(1, 64) == 8  # a long row alone: split while each keeps 8 steps


def test_union_rule():
    """Expected shared rows for uniform routing, worked by hand: 1 - E (1 - (1 - k/E)^T) / (T k)."""
    assert not moe_gemv.union_pays(1, 8, 128)  # batch 1: every row is a distinct expert
    assert not moe_gemv.union_pays(8, 8, 128)  # 51.6 distinct of 64 rows: 19% shared
    assert not moe_gemv.union_pays(16, 8, 128)  # 82.4 of 128: 36%
    assert moe_gemv.union_pays(64, 8, 128)  # 125.9 of 512: 75%
    assert not moe_gemv.union_pays(2, 2, 8)  # Mixtral: 3.5 of 4: 12.5%
    assert not moe_gemv.union_pays(4, 2, 8)  # 5.47 of 8: 32%
    assert moe_gemv.union_pays(8, 2, 8)  # 7.20 of 16: 55%


# gate|up's output in expert order has BLOCK_T - 1 padding rows never written (torch.empty); down multiplies
# them into columns it then drops, which numpy reports when the memory held NaN
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_model_decodes_a_batch_alike_on_union_kernel_and_grouped_path(q4_k_m, monkeypatch):
    kernel_model, kernel_cache = load(q4_k_m, cpu_weights="packed")
    for layer in kernel_model.layers:
        layer.mlp.kernel = moe_gemv.moe_step
    grouped_model, grouped_cache = load(q4_k_m, cpu_weights="packed")
    monkeypatch.setattr(moe_gemv, "UNION_MIN_SHARED", 0.0)  # the union mode at every step, batch 1 too
    params = moe_gemv.launch_params  # 64 output rows a program: fewer programs for the interpreter
    monkeypatch.setattr(moe_gemv, "launch_params", lambda q, n, k: {**params(q, n, k), "BLOCK_N": 64})
    calls = []
    union = moe_gemv.union_gemv
    monkeypatch.setattr(moe_gemv, "union_gemv", lambda *a, **kw: calls.append(a[2].qtype) or union(*a, **kw))
    monkeypatch.setattr(moe_gemv, "moe_gemv", None)  # the per-row mode must not run
    ids = [5, 77, 130, 9]
    torch.testing.assert_close(all_logits(kernel_model, kernel_cache, ids),
                               all_logits(grouped_model, grouped_cache, ids), atol=1e-4, rtol=1e-4)
    assert calls == ["Q4_K", "Q6_K"] * 2
    prompts = [ids, [11, 12, 200], [5, 77, 3]]  # decoded as one batch of 3
    assert greedy_together(kernel_model, kernel_cache, prompts, n=3) == \
        greedy_together(grouped_model, grouped_cache, prompts, n=3)
