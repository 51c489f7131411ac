"""Mixture-of-experts GEMV: [T * k] (token, expert) rows against stacked expert weights, indexed on the device.

A decode step of a MoE layer must read the chosen experts and nothing else, with no host sync (the step
is CUDA-graph captured, and how many rows chose an expert is only known on the device). One kernel,
`moe_gemv_kernel`, runs it in two launch modes:

    per row  (GROUPED False): program (row r, block of output rows n, K split s):  e = ids[r]
             y[r, n] += sum over s's K of x[r // X_DIV, k] * W[e, n, k]
    union    (GROUPED True):  program (expert e, block of output rows n, K split s):
             rows bounds[e] .. bounds[e + 1] of the activations, sorted by expert, BLOCK_T at a time
             y[dst[i], n] += sum over s's K of xs[i, k] * W[e, n, k]

The per-row mode reads an expert's weights once per row that chose it; the union mode groups the rows
by expert on the device first (`group`: torch.sort of the ids, per-expert bounds by searchsorted over
0..E, so every shape is static) and reads each chosen expert's weights once for all its rows (up to
BLOCK_T rows per pass; a token picks an expert at most once, so BLOCK_T = next_pow2(T) up to 16 is one
pass; an expert's last pass with 1 or at most BLOCK_T / 4 rows left runs a 1- or BLOCK_T / 4-row
instance), applying each decoded tile, held in registers, to every row: the tile is gguf_gemv.block_dot's,
whose activation loop already takes M rows at a uniform stride, so the rows are gathered into expert
order beforehand (`gather`; BLOCK_T - 1 padding rows keep its unmasked loads in bounds, their columns
are never stored). Programs of experts no row chose exit at once. Outputs go to y in expert order, or
back to the rows' own order through the permutation (dst = the sort's order). `moe_step` takes the
union mode where, for uniform routing, at least UNION_MIN_SHARED of the rows would share an expert
with another row (never at batch 1), else the per-row mode. why: docs/decisions/023-moe-union-read.md

Both modes split K where the launch has few programs (`split_for`: long expert rows, as Mixtral's down
at K = 14336), finishing the sum inside the kernel in split order (splitk.finish: deterministic).

X_DIV is k for gate|up in the per-row mode (every slot of a token reads the token's hidden state) and
1 otherwise. W is the layer's stack as held (model/moe.py, ExpertLinear): float16 / bfloat16 / float32
[E, N, K], or GGUF blocks uint8 [E, N, row_bytes] of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K
or Q6_K (every expert type of the Q2_K .. Q6_K and Q8_0 files), read in their stored blocks and unpacked
in registers by the dense GGUF GEMV's own K loop (gguf_gemv.block_dot, layouts in unpack.py and
gguf_gemv_low.py), from the row offset e * stride_we + n * row_bytes (+ the split's blocks). Only rows of
chosen experts are loaded. GPTQ and IQ4 stacks keep the grouped torch path. Accumulation is float32;
the k slots are then weighted and summed in torch. Kernels need a CUDA tensor, or the Triton interpreter
(TRITON_INTERPRET=1) for CPU tensors in tests. Why the blocks are read as stored rather than repacked
to GPTQ tensors as dense layers are: docs/decisions/021-moe-kquant-experts.md
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import splitk
from .gguf_gemv import BLOCK_BYTES, BLOCK_DOT_QTYPES, BLOCK_SIZES, FLOAT_QTYPES, block_dot, float_dot, launch_params

# (token, expert) rows the GEMV takes outside a graph capture; more (prefill) go to the grouped torch path,
# which dequantizes each chosen expert once and multiplies on cuBLAS. why: docs/decisions/019-moe-gemv-rows.md
GEMV_ROWS = 64
# the union mode from this expected share of rows whose expert another row also chose (uniform routing);
# rows a union pass takes at most. why: docs/decisions/023-moe-union-read.md
UNION_MIN_SHARED = 0.5
MAX_BLOCK_T = 16
# split K until the launch has about this many programs (a full wave of 4-warp programs on an H100's
# 132 SMs), keeping at least MIN_SPLIT_STEPS K steps a split. why: docs/decisions/023-moe-union-read.md
TARGET_PROGRAMS = 2048
MIN_SPLIT_STEPS = 8


@triton.jit
def _rows_pass(x_row, dst_ptr, w, wh, y_ptr, part_ptr, cnt_ptr, row_base, rows, t0, end, tile, k_len, N, R, stride_x,
               stride_y, pid_k, n_split, X_DIV: tl.constexpr, SCATTER: tl.constexpr, FMT: tl.constexpr,
               BLOCK_N: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr, M: tl.constexpr, S_CHUNK: tl.constexpr):
    """Rows t0 .. min(t0 + M, end) (activations from x_row) against the program's weight rows: each decoded
    tile applied to M rows; `tile` the pass's split-K counter."""
    if FMT == "float":
        acc = float_dot(x_row, stride_x, w, row_base, k_len, M, M, BLOCK_N, BLOCK_K)
    else:
        acc = block_dot(x_row, stride_x, w, wh, row_base, k_len, FMT, M, M, BLOCK_N, NB)
    t = t0 + tl.arange(0, M)
    t_ok = t < end
    if SCATTER:
        t = tl.load(dst_ptr + t, mask=t_ok, other=0).to(tl.int32)
    offs = t.to(tl.int64)[None, :] * stride_y + rows[:, None]
    splitk.finish(acc, y_ptr, part_ptr, cnt_ptr, offs, (rows < N)[:, None] & t_ok[None, :], tile, pid_k, n_split,
                  R * stride_y, S_CHUNK)


@triton.jit
def moe_gemv_kernel(x_ptr, ids_ptr, dst_ptr, w, wh, y_ptr, part_ptr, cnt_ptr, N, K, R, k_per_split, w_per_split,
                    stride_x, stride_we, stride_wn, stride_y,
                    X_DIV: tl.constexpr, GROUPED: tl.constexpr, SCATTER: tl.constexpr, FMT: tl.constexpr,
                    BLOCK_N: tl.constexpr, NB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
                    S_CHUNK: tl.constexpr):
    """ids_ptr: per row its expert (per-row mode), or the bounds [E + 1] of each expert's sorted rows (union).

    A union pass takes BLOCK_T rows; the last pass of an expert, when it has 1 or at most BLOCK_T // 4 rows
    left, runs a 1- or BLOCK_T // 4-row instance instead, so rows that do not exist cost little arithmetic
    (the row loop is unrolled at compile time)."""
    g = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    n_split = tl.num_programs(2)
    if GROUPED:
        e = g.to(tl.int64)
        start = tl.load(ids_ptr + g).to(tl.int32)
        end = tl.load(ids_ptr + g + 1).to(tl.int32)
    else:
        e = tl.load(ids_ptr + g).to(tl.int64)
        start = g
        end = g + 1
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # clamp rather than mask: the loads stay unmasked, the store drops the extra rows
    row_base = (e * stride_we + tl.minimum(rows, N - 1).to(tl.int64) * stride_wn
                + pid_k.to(tl.int64) * w_per_split)  # bytes, or float elements
    k0 = pid_k * k_per_split
    k_len = tl.minimum(k_per_split, K - k0)
    MID: tl.constexpr = BLOCK_T // 4
    for t0 in range(start, end, BLOCK_T):
        left = end - t0
        x_row = x_ptr + (e * 0 + t0 // X_DIV) * stride_x + k0  # int64 (a loop index is a plain int when interpreted)
        # the pass's counter: (block of output rows, its first row), unique since experts' rows do not overlap
        tile = pid_n * R + t0
        if BLOCK_T > 1 and left == 1:
            _rows_pass(x_row, dst_ptr, w, wh, y_ptr, part_ptr, cnt_ptr, row_base, rows, t0, end, tile, k_len, N, R,
                       stride_x, stride_y, pid_k, n_split, X_DIV, SCATTER, FMT, BLOCK_N, NB, BLOCK_K, 1, S_CHUNK)
        elif MID > 1 and left <= MID:
            _rows_pass(x_row, dst_ptr, w, wh, y_ptr, part_ptr, cnt_ptr, row_base, rows, t0, end, tile, k_len, N, R,
                       stride_x, stride_y, pid_k, n_split, X_DIV, SCATTER, FMT, BLOCK_N, NB, BLOCK_K, MID, S_CHUNK)
        else:
            _rows_pass(x_row, dst_ptr, w, wh, y_ptr, part_ptr, cnt_ptr, row_base, rows, t0, end, tile, k_len, N, R,
                       stride_x, stride_y, pid_k, n_split, X_DIV, SCATTER, FMT, BLOCK_N, NB, BLOCK_K, BLOCK_T,
                       S_CHUNK)


def supports(stack) -> bool:
    """Whether the kernel reads this ExpertLinear as held (GPTQ stacks are packed too, under another qtype)."""
    if stack.packed:
        return stack.qtype in BLOCK_DOT_QTYPES and stack.qweight.dtype == torch.uint8 and stack.qweight.stride(-1) == 1
    return stack.qtype in FLOAT_QTYPES and stack.weight.stride(-1) == 1


def split_for(programs: int, steps: int) -> int:
    """K splits for a launch of `programs` programs whose K loop has `steps` steps: doubled while the launch
    is short of TARGET_PROGRAMS and each split keeps MIN_SPLIT_STEPS steps."""
    split = 1
    while programs * split < TARGET_PROGRAMS and steps // (split * 2) >= MIN_SPLIT_STEPS:
        split *= 2
    return split


def _launch(x, ids, dst, stack, y, grid_rows: int, active: int, rows: int, x_div: int, grouped: bool,
            block_t: int, split: int | None) -> torch.Tensor:
    """One launch into y [rows (+ padding), N] float32 (contiguous); `active`: groups expected to have rows."""
    w = stack.qweight if stack.packed else stack.weight
    n, k = stack.out_features, stack.in_features
    p = launch_params(stack.qtype, n, k)  # the dense GEMV's rows and K step per program
    n_blocks = triton.cdiv(n, p["BLOCK_N"])
    if stack.packed:
        fmt, step = stack.qtype, p["NB"] * BLOCK_SIZES[stack.qtype]
    else:
        fmt, step = "float", p["BLOCK_K"]
    steps = triton.cdiv(k, step)
    split = split or split_for(active * n_blocks, steps)
    per = triton.cdiv(steps, split)  # K steps a split; then no split is empty
    split = triton.cdiv(steps, per)
    k_per_split = per * step
    w_per_split = k_per_split // BLOCK_SIZES[fmt] * BLOCK_BYTES[fmt] if stack.packed else k_per_split
    wh = w.view(torch.float16) if stack.packed else w  # the blocks' f16 fields
    part = splitk.workspace(split, rows, n, x.device)
    cnt = splitk.counters(x.device, n_blocks * rows if split > 1 else 0)  # (untouched where split == 1)
    threads = 32 * p["num_warps"]
    moe_gemv_kernel[(grid_rows, n_blocks, split)](
        x, ids, ids if dst is None else dst, w, wh, y, part, cnt, n, k, rows, k_per_split, w_per_split,
        x.stride(0), w.stride(0), w.stride(1), y.stride(0),
        X_DIV=x_div, GROUPED=grouped, SCATTER=dst is not None, FMT=fmt, BLOCK_N=p["BLOCK_N"], NB=p.get("NB", 1),
        BLOCK_K=p.get("BLOCK_K", 1), BLOCK_T=block_t, S_CHUNK=splitk.chunk(max(1, p["BLOCK_N"] * block_t // threads)),
        num_warps=p["num_warps"])
    return y


def moe_gemv(x: torch.Tensor, ids: torch.Tensor, stack, x_div: int, split: int | None = None) -> torch.Tensor:
    """Per-row mode: y [R, N] float32, row r is x[r // x_div] @ W[ids[r]].T, for ids [R] (int) and x [R / x_div, K]."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    rows = ids.numel()
    y = torch.empty((rows, stack.out_features), dtype=torch.float32, device=x.device)
    if rows:
        _launch(x, ids, None, stack, y, rows, rows, rows, x_div, False, 1, split)
    return y


class Groups(NamedTuple):
    """A step's (token, expert) rows grouped by expert, on the device: rows order[bounds[e]:bounds[e + 1]] chose e."""
    order: torch.Tensor  # int64 [R]: the sorted position's row
    bounds: torch.Tensor  # int64 [E + 1]
    rows: int
    block_t: int  # rows a union pass takes (a power of two)


def group(ids: torch.Tensor, num_experts: int, tokens: int) -> Groups:
    """Sort the flat expert ids [R] (stable: a token's slots keep their order within an expert); no host sync."""
    sorted_ids, order = torch.sort(ids, stable=True)
    edges = torch.arange(num_experts + 1, device=ids.device, dtype=sorted_ids.dtype)
    bounds = torch.searchsorted(sorted_ids, edges)  # first sorted position of each expert id, R past the last
    return Groups(order, bounds, ids.numel(), min(MAX_BLOCK_T, triton.next_power_of_2(max(1, tokens))))


def gather(x: torch.Tensor, groups: Groups, x_div: int) -> torch.Tensor:
    """x's rows in expert order, [R + block_t - 1, K]: sorted row i is x[order[i] // x_div]; the padding repeats row 0."""
    src = torch.nn.functional.pad(groups.order // x_div, (0, groups.block_t - 1))
    return x.index_select(0, src)


def union_gemv(xs: torch.Tensor, groups: Groups, stack, scatter: bool, split: int | None = None) -> torch.Tensor:
    """Union mode over gathered xs [R + block_t - 1, K]: y float32, rows in the original order [R] (scatter)
    or in expert order [R + block_t - 1] (the padding rows unwritten, as a next union launch's input)."""
    xs = xs if xs.stride(-1) == 1 else xs.contiguous()
    rows, e = groups.rows, stack.num_experts
    y = torch.empty((rows if scatter else rows + groups.block_t - 1, stack.out_features), dtype=torch.float32,
                    device=xs.device)
    if rows:
        _launch(xs, groups.bounds, groups.order if scatter else None, stack, y, e, min(e, rows), rows, 1, True,
                groups.block_t, split)
    return y


def union_pays(tokens: int, k: int, num_experts: int) -> bool:
    """Whether, for uniform routing, at least UNION_MIN_SHARED of the T * k rows pick an expert another row picks:
    expected distinct experts E * (1 - (1 - k / E) ** T) against T * k rows."""
    distinct = num_experts * (1.0 - (1.0 - k / num_experts) ** tokens)
    return 1.0 - distinct / (tokens * k) >= UNION_MIN_SHARED


def moe_step(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, moe, ops) -> torch.Tensor | None:
    """The SparseMoE kernel hook: the layer's output [T, hidden], or None to leave the step to the grouped path."""
    t, k = ids.shape
    if t * k > GEMV_ROWS and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    flat = ids.reshape(-1).contiguous()
    if union_pays(t, k, moe.num_experts):
        groups = group(flat, moe.num_experts, t)
        h = ops.silu_mul(union_gemv(gather(x, groups, k), groups, moe.gate_up, scatter=False).to(x.dtype))
        y = union_gemv(h, groups, moe.down, scatter=True)
    else:
        h = ops.silu_mul(moe_gemv(x, flat, moe.gate_up, k).to(x.dtype))
        y = moe_gemv(h, flat, moe.down, 1)
    return (y.view(t, k, -1) * weights[..., None]).sum(dim=1).to(x.dtype)


def moe_kernel_for(moe):
    """moe_step when the kernel reads both of the layer's stacks, else None (its grouped torch path)."""
    return moe_step if supports(moe.gate_up) and supports(moe.down) else None
