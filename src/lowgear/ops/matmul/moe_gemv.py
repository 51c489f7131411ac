"""Mixture-of-experts GEMV: [T * k] (token, expert) rows against stacked expert weights, indexed on the device.

A decode step of a MoE layer must read the k chosen experts of each token and nothing else. The
torch path (model/moe.py) groups tokens by expert, which needs the counts on the host; this kernel
takes the expert ids as a device tensor instead:

    program (row r, block of output rows n):  e = ids[r];  y[r, n] = sum over K of x[r // X_DIV, k] * W[e, n, k]

X_DIV is k for gate|up (every slot of a token reads the token's hidden state) and 1 for down (each
slot reads its own SwiGLU output). W is the layer's stack as held (model/moe.py, ExpertLinear):
float16 / bfloat16 / float32 [E, N, K], or GGUF blocks uint8 [E, N, row_bytes] of Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K or Q6_K (every expert type of the Q2_K .. Q6_K and Q8_0 files),
read in their stored blocks and unpacked in registers by the dense GGUF GEMV's own K loop
(gguf_gemv.block_dot, layouts in unpack.py and gguf_gemv_low.py), from the row offset
e * stride_we + n * row_bytes. Only rows of chosen experts are loaded, so a batch-1 step reads k
experts' stored bytes per layer. GPTQ and IQ4 stacks keep the grouped torch path. Accumulation is float32; the k slots
are then weighted and summed in torch. Kernels need a CUDA tensor, or the Triton interpreter
(TRITON_INTERPRET=1) for CPU tensors in tests. why the blocks are read as stored rather than repacked
to GPTQ tensors as dense layers are: docs/decisions/021-moe-kquant-experts.md
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gguf_gemv import BLOCK_DOT_QTYPES, FLOAT_QTYPES, block_dot, float_dot, launch_params

# (token, expert) rows the GEMV takes outside a graph capture; more (prefill) go to the grouped torch path,
# which reads each chosen expert once for all its tokens where the GEMV would read it once per row.
# why: docs/decisions/019-moe-gemv-rows.md
GEMV_ROWS = 64


@triton.jit
def moe_gemv_kernel(x_ptr, ids_ptr, w, wh, y_ptr, N, K, stride_x, stride_we, stride_wn, stride_y,
                    X_DIV: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(ids_ptr + r).to(tl.int64)
    # clamp rather than mask: the loads stay unmasked, the store drops the extra rows
    row_base = e * stride_we + tl.minimum(rows, N - 1).to(tl.int64) * stride_wn  # bytes, or float elements
    x_row = x_ptr + (r // X_DIV).to(tl.int64) * stride_x
    if FMT == "float":
        acc = float_dot(x_row, 0, w, row_base, K, 1, 1, BLOCK_N, BLOCK_K)
    else:
        acc = block_dot(x_row, 0, w, wh, row_base, K, FMT, 1, 1, BLOCK_N, NB)
    tl.store(y_ptr + r.to(tl.int64) * stride_y + rows, tl.sum(acc, axis=1), mask=rows < N)


def supports(stack) -> bool:
    """Whether the kernel reads this ExpertLinear as held (GPTQ stacks are packed too, under another qtype)."""
    if stack.packed:
        return stack.qtype in BLOCK_DOT_QTYPES and stack.qweight.dtype == torch.uint8 and stack.qweight.stride(-1) == 1
    return stack.qtype in FLOAT_QTYPES and stack.weight.stride(-1) == 1


def moe_gemv(x: torch.Tensor, ids: torch.Tensor, stack, x_div: int) -> torch.Tensor:
    """y [R, N] float32: row r is x[r // x_div] @ W[ids[r]].T, for ids [R] (int) and x [R / x_div, K]."""
    w = stack.qweight if stack.packed else stack.weight
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, n, k = ids.numel(), stack.out_features, stack.in_features
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    if rows:
        p = launch_params(stack.qtype, n, k)  # the dense GEMV's rows and K step per program
        fmt = stack.qtype if stack.packed else "float"
        wh = w.view(torch.float16) if stack.packed else w  # the blocks' f16 fields
        moe_gemv_kernel[(rows, triton.cdiv(n, p["BLOCK_N"]))](
            x, ids, w, wh, y, n, k, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
            X_DIV=x_div, FMT=fmt, BLOCK_N=p["BLOCK_N"], NB=p.get("NB", 1), BLOCK_K=p.get("BLOCK_K", 1),
            num_warps=p["num_warps"])
    return y


def moe_step(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, moe, ops) -> torch.Tensor | None:
    """The SparseMoE kernel hook: the layer's output [T, hidden], or None to leave the step to the grouped path."""
    t, k = ids.shape
    if t * k > GEMV_ROWS and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    flat = ids.reshape(-1).contiguous()
    h = ops.silu_mul(moe_gemv(x, flat, moe.gate_up, k).to(x.dtype))
    y = moe_gemv(h, flat, moe.down, 1)
    return (y.view(t, k, -1) * weights[..., None]).sum(dim=1).to(x.dtype)


def moe_kernel_for(moe):
    """moe_step when the kernel reads both of the layer's stacks, else None (its grouped torch path)."""
    return moe_step if supports(moe.gate_up) and supports(moe.down) else None
