"""What a decode step would cost on a GPU that is not here (a T4, a V100): bytes and arithmetic per kernel path.

For each linear weight of the model this counts what lowgear's kernels on that GPU would do at M
activation rows (the decode batch): which path serves it (`path`, the same rules as ops/matmul's
routing), the bytes it reads and writes as held on the device (GGUF types held as GPTQ tensors at
their held width: ops/matmul/repack.py), and the FP32 lane instructions it issues (unpacking codes
and one FMA per code per row: the GEMVs use no tensor cores). A path's time is the larger of its bytes
over the memory bandwidth and its instructions over the FP32 issue rate, each at an efficiency below
the datasheet's (MEMORY_EFFICIENCY, ISSUE_EFFICIENCY); the step adds the KV cache's bytes and a fixed
cost per kernel. The lm_head counts as a linear; the embedding reads one row.

It is a model, not a measurement: what it is for is the shape (which resource binds at which batch
and which path is the slow one), and the `t4-v100` rung of `lowgear bench` runs the same kernels
on a real GPU to check it. why: docs/decisions/014-old-gpu-cost-model.md
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..formats.blocks import FLOAT_TYPES, get_format

# fractions of datasheet bandwidth and FP32 issue rate that well-made kernels reach (assumed)
MEMORY_EFFICIENCY = 0.8
ISSUE_EFFICIENCY = 0.7
TENSOR_EFFICIENCY = 0.5
KERNEL_US = 3.0  # GPU time between back-to-back graphed kernels, and kernels per decoder layer
KERNELS_PER_LAYER = 10
# FP32 lane instructions a code costs, besides one FMA per activation row
UNPACK_GPTQ = 2  # mask-or into a float's mantissa, subtract (gptq_gemv.py)
UNPACK_HALF2 = 2  # the whole packed-half2 path at one fp16 row, FMA included (f16x2.py)
UNPACK_BLOCK = 4  # GGUF block GEMVs (gguf_gemv.py)
UNPACK_DEQUANT = 3  # the prefill dequantizer, per code, before cuBLAS
UNPACK_QMMA = 2  # mma.sync kernel: shift, mask-or and fma per pair of codes, plus the group fold (qmma.cu)
UNPACK_QMMA_DQ = 2.5  # its DQ build past qmma.FOLD_MAX_M rows: one more half2 fma a code pair (scale, -zero x scale)


_GPTQ = re.compile(r"GPTQ(\d)g(-?\d+)")  # a GPTQ folder's qtype: bits, group size


@dataclass(frozen=True)
class GPU:
    name: str
    cc: tuple[int, int]
    bandwidth: float  # bytes/s, datasheet
    fp32_flops: float  # FLOP/s, datasheet (an FMA is two)
    fp16_tensor_flops: float


GPUS = {
    "t4": GPU("Tesla T4", (7, 5), 320e9, 8.1e12, 65e12),
    "v100": GPU("Tesla V100-SXM2-16GB", (7, 0), 900e9, 15.7e12, 125e12),
}


@dataclass(frozen=True)
class Linear:
    qtype: str  # a GGUF type, "GPTQ4g128", or F16/BF16/F32
    out_features: int
    in_features: int

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features


def held_bits(qtype: str, act_bytes: int = 2) -> tuple[float, str]:
    """(bits a weight as lowgear holds it on a GPU, the family: "float", "gptq" or "block")."""
    from ..ops.matmul import repack

    if qtype in FLOAT_TYPES:
        return 8.0 * act_bytes, "float"
    if qtype in repack.EXACT or qtype in repack.FLOAT_ZERO:  # codes, fp16 scale and zeros per group (repack.held_bits)
        return repack.held_bits(qtype), "gptq"
    m = _GPTQ.fullmatch(qtype)
    if m:
        bits, group = int(m.group(1)), int(m.group(2))
        return bits + ((32 + bits) / group if group > 0 else 0.0), "gptq"
    fmt = get_format(qtype)
    return 8.0 * fmt.block_bytes / fmt.block_size, "block"


def code_bits(qtype: str) -> int | None:
    """The width of the codes a GPTQ-form weight holds (None for float and block types)."""
    from ..ops.matmul import repack

    if qtype in repack.EXACT or qtype in repack.FLOAT_ZERO:
        return repack.layout(qtype)[0]
    m = _GPTQ.fullmatch(qtype)
    return int(m.group(1)) if m else None


def path(gpu: GPU, family: str, m: int, bits: float, codes: int | None = None) -> str:
    """The kernel path lowgear takes for M rows of one weight family on this GPU (ops/matmul's rules);
    codes: the code width of a GPTQ-form weight (4 or 8 can take the mma.sync kernel on sm_75+)."""
    from ..ops.matmul import MAX_M as BLOCK_MAX_M, qmma
    from ..ops.matmul.gptq_gemv import MAX_M as GPTQ_MAX_M, MMA_FROM_M, QMMA_FROM_M
    from ..ops.matmul.gptq_mma import MMA_MAX_M

    if family == "float":
        return "gemv" if m <= BLOCK_MAX_M else "cublas"
    if family == "block":
        return "gemv" if m <= BLOCK_MAX_M else "dequant+cublas"
    if gpu.cc >= qmma.MIN_CAPABILITY and codes in qmma.BITS and QMMA_FROM_M <= m <= qmma.ROUTE_MAX_M:
        return "qmma"
    if gpu.cc >= (8, 0) and MMA_FROM_M <= m <= MMA_MAX_M:
        return "mma"
    if m <= (BLOCK_MAX_M if gpu.cc >= (8, 0) else GPTQ_MAX_M):
        return "half2-gemv" if m == 1 and bits < 8 else "gemv"
    return "dequant+cublas"


def linear_cost(gpu: GPU, lin: Linear, m: int, act_bytes: int = 2) -> dict:
    """Bytes, instructions, tensor FLOPs and seconds of one linear at M rows."""
    bits, family = held_bits(lin.qtype, act_bytes)
    route = path(gpu, family, m, bits, code_bits(lin.qtype))
    w = lin.weights
    nbytes = w * bits / 8 + m * (lin.in_features + lin.out_features) * act_bytes
    instr, tensor = 0.0, 0.0
    if route == "gemv":
        instr = w * ((UNPACK_BLOCK if family == "block" else UNPACK_GPTQ if family == "gptq" else 0) + m)
    elif route == "half2-gemv":
        instr = w * UNPACK_HALF2
    elif route == "mma":
        instr, tensor = w * UNPACK_DEQUANT, 2.0 * m * w
    elif route == "qmma":  # x's rows padded to the mma's 8 columns
        from ..ops.matmul.qmma import FOLD_MAX_M
        instr = w * (UNPACK_QMMA if m <= FOLD_MAX_M else UNPACK_QMMA_DQ)
        tensor = 2.0 * 8 * math.ceil(m / 8) * w
    elif route == "cublas":
        tensor = 2.0 * m * w
    else:  # dequant+cublas: W.T written in fp16 and read back by the matmul
        nbytes += 2 * w * act_bytes
        instr, tensor = w * UNPACK_DEQUANT, 2.0 * m * w
    t_mem = nbytes / (gpu.bandwidth * MEMORY_EFFICIENCY)
    t_issue = instr / (gpu.fp32_flops / 2 * ISSUE_EFFICIENCY)
    t_tensor = tensor / (gpu.fp16_tensor_flops * TENSOR_EFFICIENCY)
    seconds = max(t_mem, t_issue, t_tensor)
    bound = "memory" if seconds == t_mem else ("arithmetic" if seconds == t_issue else "tensor cores")
    return {"path": route, "bytes": nbytes, "instructions": instr, "seconds": seconds, "bound": bound}


def linears_of(source) -> list[Linear]:
    """Every linear weight a decode step reads (decoder layers and lm_head; a tied head is the embedding)."""
    out, embed = [], None
    for name in source.names():
        info = source.info(name)
        if len(info.shape) != 2:
            continue
        if name == "embed":
            embed = info
        elif name.startswith("layers.") or name == "lm_head":
            out.append(Linear(info.qtype, int(info.shape[0]), int(info.shape[1])))
    if "lm_head" not in source.names() and embed is not None:
        out.append(Linear(embed.qtype, int(embed.shape[0]), int(embed.shape[1])))
    return out


def predict(gpu: GPU, spec, linears: list[Linear], batch: int, context: int, act_bytes: int = 2) -> dict:
    """One decode step of `batch` sequences at `context` tokens each: seconds, tokens/s, the binding
    resource of the weights' time, and the time by path."""
    by_path: dict[str, float] = {}
    bound: dict[str, float] = {}
    weights = 0.0
    for lin in linears:
        c = linear_cost(gpu, lin, batch, act_bytes)
        by_path[c["path"]] = by_path.get(c["path"], 0.0) + c["seconds"]
        bound[c["bound"]] = bound.get(c["bound"], 0.0) + c["seconds"]
        weights += c["seconds"]
    kv = batch * context * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * act_bytes
    t_kv = kv / (gpu.bandwidth * MEMORY_EFFICIENCY)
    t_launch = spec.num_layers * KERNELS_PER_LAYER * KERNEL_US * 1e-6
    seconds = weights + t_kv + t_launch
    worst = max(bound, key=bound.get) if bound else "memory"
    if t_launch > weights + t_kv:
        worst = "kernel launch"
    return {"gpu": gpu.name, "batch": batch, "context": context, "ms_per_step": 1e3 * seconds,
            "tokens_per_s": batch / seconds, "bound": worst,
            "ms_by_path": {k: 1e3 * v for k, v in sorted(by_path.items(), key=lambda kv: -kv[1])},
            "ms_kv": 1e3 * t_kv, "ms_launch": 1e3 * t_launch}


def old_gpu_predictions(source, batches=(1, 16), context: int = 512) -> list[dict]:
    """doctor's table: each old GPU of GPUS at each batch, for this model's weights."""
    spec = source.spec
    linears = linears_of(source)
    if not linears or not math.isfinite(sum(lin.weights for lin in linears)):
        return []
    return [predict(gpu, spec, linears, b, context) for gpu in GPUS.values() for b in batches]
