"""Mixture-of-experts GEMV: [T * k] (token, expert) rows against stacked expert weights, indexed on the device.

A decode step of a MoE layer must read the k chosen experts of each token and nothing else. The
torch path (model/moe.py) groups tokens by expert, which needs the counts on the host; this kernel
takes the expert ids as a device tensor instead:

    program (row r, block of output rows n):  e = ids[r];  y[r, n] = sum over K of x[r // X_DIV, k] * W[e, n, k]

X_DIV is k for gate|up (every slot of a token reads the token's hidden state) and 1 for down (each
slot reads its own SwiGLU output). W is the layer's stack as held (model/moe.py, ExpertLinear):
float16 / bfloat16 / float32 [E, N, K], or GGUF Q8_0 / Q4_0 blocks uint8 [E, N, row_bytes]
dequantized in the loop (Q8_0: fp16 scale, 32 int8; Q4_0: fp16 scale, 16 bytes whose low nibbles are
weights 0-15 and high nibbles 16-31, each minus 8). Only rows of chosen experts are loaded, so a
batch-1 step reads k experts' bytes per layer. Other stacked formats (GPTQ, the K-quants) keep the
grouped torch path. Accumulation is float32; the k slots are then weighted and summed in torch.
Kernels need a CUDA tensor, or the Triton interpreter (TRITON_INTERPRET=1) for CPU tensors in tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (token, expert) rows the GEMV takes outside a graph capture; more (prefill) go to the grouped torch path,
# which reads each chosen expert once for all its tokens where the GEMV would read it once per row.
# why: docs/decisions/019-moe-gemv-rows.md
GEMV_ROWS = 64
BLOCK_N = 16
BLOCK_K = 128  # a multiple of the 32-weight GGUF block

_FMT = {"F16": 0, "BF16": 0, "F32": 0, "Q8_0": 1, "Q4_0": 2}


@triton.jit
def moe_gemv_kernel(x_ptr, ids_ptr, w_ptr, y_ptr, N, K, stride_x, stride_we, stride_wn, stride_y,
                    X_DIV: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    e = tl.load(ids_ptr + r).to(tl.int64)
    w_base = w_ptr + e * stride_we + rows.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    x_base = x_ptr + (r // X_DIV).to(tl.int64) * stride_x
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        kmask = k < K
        m = rmask[:, None] & kmask[None, :]
        x = tl.load(x_base + k, mask=kmask, other=0.0).to(tl.float32)
        if FMT == 0:
            w = tl.load(w_base + k[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            blk = k // 32
            i = k % 32
            if FMT == 1:  # Q8_0: 34-byte blocks
                p = w_base + (blk * 34)[None, :]
                q = tl.load(p + 2 + i[None, :], mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            else:  # Q4_0: 18-byte blocks
                p = w_base + (blk * 18)[None, :]
                byte = tl.load(p + 2 + (i % 16)[None, :], mask=m, other=0).to(tl.int32)
                q = ((byte >> ((i // 16) * 4)[None, :]) & 15).to(tl.float32) - 8.0
            lo = tl.load(p, mask=m, other=0).to(tl.uint16)
            hi = tl.load(p + 1, mask=m, other=0).to(tl.uint16)
            d = (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            w = q * d
        acc += w * x[None, :]
    tl.store(y_ptr + r.to(tl.int64) * stride_y + rows, tl.sum(acc, axis=1), mask=rmask)


def supports(stack) -> bool:
    """Whether the kernel reads this ExpertLinear as held."""
    return stack.qtype in _FMT and (stack.packed or stack.weight.stride(-1) == 1)


def moe_gemv(x: torch.Tensor, ids: torch.Tensor, stack, x_div: int) -> torch.Tensor:
    """y [R, N] float32: row r is x[r // x_div] @ W[ids[r]].T, for ids [R] (int) and x [R / x_div, K]."""
    w = stack.qweight if stack.packed else stack.weight
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows, n = ids.numel(), stack.out_features
    y = torch.empty((rows, n), dtype=torch.float32, device=x.device)
    if rows:
        moe_gemv_kernel[(rows, triton.cdiv(n, BLOCK_N))](
            x, ids, w, y, n, stack.in_features, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
            X_DIV=x_div, FMT=_FMT[stack.qtype], BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
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
