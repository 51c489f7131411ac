"""bench/costmodel.py: doctor's T4 / V100 prediction, checked against figures worked out by hand from
the datasheets (T4: 320 GB/s, 8.1 TFLOP/s FP32; V100: 900 GB/s, 15.7 TFLOP/s) and the model's stated
efficiencies, and the kernel routes against ops/matmul's own limits."""

import pytest
import torch

from lowgear.bench import costmodel as cm
from lowgear.bench.models import PRESETS, QUANTS, RandomSource

T4, V100 = cm.GPUS["t4"], cm.GPUS["v100"]
AMPERE = cm.GPU("A100-like", (8, 0), 2039e9, 19.5e12, 312e12)


def test_held_bits_are_what_the_gpu_holds():
    assert cm.held_bits("F16") == (16.0, "float")
    assert cm.held_bits("Q4_0") == (4 + 20 / 32, "gptq")  # codes + fp16 scale and 4-bit packed zero per 32
    assert cm.held_bits("Q8_0") == (8 + 24 / 32, "gptq")
    assert cm.held_bits("Q4_K") == (5.0, "gptq")  # codes + fp16 scale and zero per 32
    assert cm.held_bits("Q6_K") == (9.0, "gptq")  # 8-bit codes + fp16 scale per 16 (its zero, 32: one row)
    assert cm.held_bits("Q5_0") == (8.5, "gptq")
    assert cm.held_bits("GPTQ4g128") == (4 + 36 / 128, "gptq")
    assert cm.held_bits("IQ4_XS") == (8 * 136 / 256, "block")


def test_a_float16_weight_at_batch_one_is_its_bytes_over_the_bandwidth():
    c = cm.linear_cost(T4, cm.Linear("F16", 4096, 4096), 1)
    want_bytes = 4096 * 4096 * 2 + (4096 + 4096) * 2
    assert c["bytes"] == want_bytes and c["path"] == "gemv" and c["bound"] == "memory"
    assert c["seconds"] == pytest.approx(want_bytes / (320e9 * 0.8))


def test_the_gemv_turns_arithmetic_bound_as_rows_grow_on_a_v100():
    lin = cm.Linear("GPTQ4g128", 4096, 4096)
    one = cm.linear_cost(V100, lin, 1)
    eight = cm.linear_cost(V100, lin, 8)
    assert one["path"] == "half2-gemv" and one["bound"] == "memory"
    assert eight["path"] == "gemv" and eight["bound"] == "arithmetic"
    # 4096 * 4096 codes, 2 unpack instructions + 8 FMAs each, at 15.7e12 / 2 lane instructions a second x 0.7
    assert eight["seconds"] == pytest.approx(4096 * 4096 * 10 / (7.85e12 * 0.7))
    # a T4 at 8 rows takes the mma.sync kernel: the codes' bytes over its bandwidth
    t4 = cm.linear_cost(T4, lin, 8)
    assert t4["path"] == "qmma" and t4["bound"] == "memory"


def test_routes_follow_ops_matmul():
    from lowgear.ops.matmul import qmma
    from lowgear.ops.matmul.gptq_gemv import MAX_M, MMA_FROM_M, QMMA_FROM_M

    assert cm.path(T4, "gptq", MAX_M, 4) == "gemv"  # no code width given: not the mma.sync kernel
    assert cm.path(T4, "gptq", MAX_M + 1, 4) == "dequant+cublas"  # no tl.dot tensor cores below sm_80
    assert cm.path(T4, "gptq", QMMA_FROM_M, 4.25, codes=4) == "qmma"  # mma.sync m16n8k8 on sm_75
    assert cm.path(T4, "gptq", qmma.ROUTE_MAX_M + 1, 4.25, codes=4) == "dequant+cublas"
    assert cm.path(V100, "gptq", 16, 4.25, codes=4) == "dequant+cublas"  # sm_70: no m16n8k8
    assert cm.path(T4, "gptq", 16, 3.25, codes=3) == "dequant+cublas"  # 3-bit codes straddle words
    assert cm.path(AMPERE, "gptq", MMA_FROM_M, 4) == "mma"
    assert cm.path(AMPERE, "gptq", qmma.ROUTE_MAX_M, 4.25, codes=4) == "qmma"
    assert cm.path(AMPERE, "gptq", qmma.ROUTE_MAX_M + 1, 4.25, codes=4) == "mma"
    assert cm.path(T4, "block", 5, 4) == "dequant+cublas"
    assert cm.code_bits("Q4_K") == 4 and cm.code_bits("Q6_K") == 8 and cm.code_bits("GPTQ4g128") == 4
    assert cm.code_bits("F16") is None and cm.code_bits("IQ4_XS") is None
    # the dequantize path writes W.T in fp16 and reads it back: 4 bytes a weight on top of the codes
    c = cm.linear_cost(V100, cm.Linear("GPTQ4g128", 4096, 4096), 16)
    assert c["path"] == "dequant+cublas"
    assert c["bytes"] == pytest.approx(4096 * 4096 * (4 + 36 / 128) / 8 + 16 * 8192 * 2 + 4 * 4096 * 4096)
    # the mma.sync kernel reads the codes once: 16 rows cost the codes' bytes (memory-bound on a T4)
    c = cm.linear_cost(T4, cm.Linear("GPTQ4g128", 4096, 4096), 16)
    assert c["path"] == "qmma" and c["bound"] == "memory"
    assert c["seconds"] == pytest.approx((4096 * 4096 * (4 + 36 / 128) / 8 + 16 * 8192 * 2) / (320e9 * 0.8))



def test_qmma_instructions_follow_its_build(monkeypatch):
    """The fold build (to 16 rows) costs 2 instructions a code, the DQ build past it 2.5 (one more half2 fma a
    code pair), whatever rows gptq_matmul routes to the kernel."""
    from lowgear.ops.matmul import qmma

    monkeypatch.setattr(qmma, "ROUTE_MAX_M", 64)
    w = 4096 * 4096
    at16 = cm.linear_cost(AMPERE, cm.Linear("GPTQ4g128", 4096, 4096), 16)
    at17 = cm.linear_cost(AMPERE, cm.Linear("GPTQ4g128", 4096, 4096), 17)
    assert at16["path"] == at17["path"] == "qmma"
    assert at16["instructions"] == 2 * w and at17["instructions"] == 2.5 * w

def test_llama3_8b_in_4_bit_on_old_gpus():
    """The shape of the answer for the model users bring: batch 1 memory-bound near bandwidth / bytes;
    batch 16 on a T4 through the mma.sync kernel, memory-bound on the codes (faster than float16 there), and
    on a V100 (no m16n8k8) through the dequantize path, which makes 4-bit batched decode slower than float16."""
    spec = PRESETS["llama3-8b"]
    q4 = cm.old_gpu_predictions(RandomSource(spec, QUANTS["q4_k"], torch.device("meta"), torch.float16))
    f16 = cm.old_gpu_predictions(RandomSource(spec, None, torch.device("meta"), torch.float16))
    by = {(r["gpu"], r["batch"]): r for r in q4}
    t4_1 = by[(T4.name, 1)]
    assert t4_1["bound"] == "memory" and 40 < t4_1["tokens_per_s"] < 60  # ~5 GB at 256 GB/s
    t4_16 = by[(T4.name, 16)]
    assert next(iter(t4_16["ms_by_path"])) == "qmma" and t4_16["bound"] == "memory"
    f16_by = {(r["gpu"], r["batch"]): r for r in f16}
    assert t4_16["tokens_per_s"] > 3 * f16_by[(T4.name, 16)]["tokens_per_s"] / 2  # ~5 GB read, against 16 GB
    # batch 16 reads the codes once: its step within 1.5x of batch 1's (KV and the head's float rows aside)
    assert t4_16["ms_per_step"] < 1.5 * t4_1["ms_per_step"]
    v100_16 = by[(V100.name, 16)]
    assert next(iter(v100_16["ms_by_path"])) == "dequant+cublas"
    assert v100_16["tokens_per_s"] < f16_by[(V100.name, 16)]["tokens_per_s"]
    assert by[(V100.name, 1)]["tokens_per_s"] > 2 * t4_1["tokens_per_s"]  # 900 vs 320 GB/s
