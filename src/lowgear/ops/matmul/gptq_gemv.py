"""Triton kernels over GPTQ tensors: a split-K decode GEMV and a prefill dequantizer.

GPTQ packs codes along the input dim K, so a qweight row holds PACK consecutive K values of every
output column and its N words are contiguous. The GEMV (y[M, N] = x[M, K] @ W.T, M <= MAX_M) reads
that layout as stored: a program owns BLOCK_N columns (one 16-byte load per thread per word row, so
a warp reads 512 contiguous bytes) and a K-slice of whole tiles; a tile is BLOCK_R row-groups (a
row-group is one word, or three for 3-bit, = PACK codes) that lie in one quantization group, so the
group's scale and zero are loaded once per tile and the scale is factored out of the tile's sum.

Codes become floats without `cvt` (a quarter-rate instruction on recent GPUs, which made the unpack
compute-bound): a code masked in place at bit `off` of a word is OR-ed with the exponent of
2**(23 - off), which makes the float 2**(23 - off) + code exactly; subtracting 2**(23 - off) + zero
gives code - zero (ExLlama's / Marlin's fp16 trick, in fp32; bits above 22 from the word shifted by 16).
Per code that is one LOP3, one FSUB and one FMA per activation row. For 4-bit
codes and fp16 activations the GEMV takes the same trick in packed half2 instead (`f16x2.py`: about
two instructions a code, fp16 sums of four products added in fp32).

Split-K: an N = 4096 layer has only 8-16 column blocks, far fewer than the 132 SMs of an H100, so
the K range is split too. Partial sums go to an fp32 workspace [splits, M, N] (it stays in L2) and
the last program of each column block adds them in split order (`splitk.py`): one launch, and
deterministic results (greedy decoding is reproducible, CUDA-graph replays match eager steps).

Act-order (g_idx): a checkpoint's groups are scattered over K, which would cost a scale and zero
gather per code. `sort_act_order` (run once, at `prepare`) sorts K by group and repacks the codes,
so groups are contiguous again; x's columns are gathered through the permutation inside the
kernel (or by torch first, `x_perm="torch"`).

Buffers: `prepare` adds `gptq_zeros` (fp16 [groups, N], zero + offset: a contiguous load, as big
as the scales; one row [1, N] where a column's groups share their zero, ZROW in the kernels). For
act-order it sorts in place: the module's `qweight` becomes the sorted codes, its `g_idx` becomes None
(groups are now k // group_size) and `gptq_perm` (int32 [K]: sorted row i is input feature perm[i]) is
registered, which QuantLinear's torch path reads to put W's columns
back (`QuantLinear._dequant`). So an act-order layer holds its codes once, as stored.

QMMA_FROM_M <= M <= qmma.ROUTE_MAX_M rows of 4/8-bit layers on sm_75+ go to `qmma.qmma` (a CUDA C mma.sync kernel
built by NVRTC: sm_75's one tensor-core route, and faster than the GEMV and tl.dot there on newer cards).
Past it, batched decode (MMA_FROM_M <= M <= gptq_mma.MMA_MAX_M, fp16 / bf16 activations, 2/4/8-bit) on
compute capability >= 8.0 goes to `gptq_mma.gptq_mma`: the same operands, codes unpacked in registers and
multiplied with tl.dot (tensor-core mma there). It lives in its own file because tl.dot is what
sm_70 / sm_75 must not run (Triton lowers it to FMAs); `gptq_matmul` checks the capability.

Prefill (M > MMA_MAX_M, or any M > MAX_M where the tl.dot kernel does not serve) is compute-bound: `dequantize_t` writes W.T
for a band of columns in the activation dtype and torch.matmul (cuBLAS, tensor cores on every GPU)
does the rest. It reads the stored buffers directly (any bits, any g_idx). No kernel in this file
uses tl.dot (sm_70 / sm_75 safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...platform import hardware
from .. import nvrtc, pdl
from ...formats.dequant import banded_matmul
from ...formats.gptq import gptq_groups, one_zero_row, zero_row
from ...formats.gptq import pack_codes, pack_shape  # noqa: F401 (re-exported)
from . import f16x2, gptq_mma, qmma, splitk
from .unpack import stream_code

# GEMV up to this many activation rows where the tl.dot kernel cannot take over (sm < 8.0, or a layer
# it cannot serve); past it dequantize + cuBLAS. The GEMV's work grows by one FMA per code per row.
MAX_M = 8
MMA_FROM_M = 5  # on sm >= 8.0 the tl.dot kernel (gptq_mma.py) from here on; why: docs/decisions/004-gemv-row-limits.md
QMMA_FROM_M = 4  # the mma.sync kernel (qmma.py) from here to qmma.ROUTE_MAX_M rows; why: docs/decisions/026-*.md
# GEMV launch: num_warps for every M, row-groups per tile at most (8 = 64 inputs at 4 bits), K split
# into at least MIN_SPLIT parts; the packed-half2 unpack (f16x2.py) takes HALF2_* at one activation
# row and GEMV_TILE_ROWS past it. why: docs/decisions/005-gptq-gemv-launch.md
GEMV_NUM_WARPS = 2
GEMV_TILE_ROWS = 8
MIN_SPLIT = 32
HALF2_TILE_ROWS = 16
HALF2_MIN_SPLIT = 8
# SPAN_GROUPS: tiles of the caps above even where a group is smaller (GGUF's groups of 16 and 32 hold 2-8 row-groups),
# each row-group scaled by its own group (the kernel's SPAN); off: a tile lies in one group. Not yet timed on a GPU:
# docs/decisions/005-gptq-gemv-launch.md
SPAN_GROUPS = False
# temporary bound for the prefill path: columns per band so that K * band <= this
PREFILL_BAND_ELEMS = 1 << 24
# programs to aim for when picking split-K: a few per SM of an H100 (132 SMs); fewer SMs just queue
TARGET_PROGRAMS = 4 * 132


@triton.jit
def _word(w0, w1, w2, I: tl.constexpr):
    if I == 0:
        r = w0
    elif I == 1:
        r = w1
    else:
        r = w2
    return r


@triton.jit
def _code_minus_zero(w0, w1, w2, zf, J: tl.constexpr, BITS: tl.constexpr):
    """(code J of each row-group) - zero as fp32, through the exponent trick (no int->float cvt)."""
    P: tl.constexpr = J * BITS
    WI: tl.constexpr = P // 32
    S: tl.constexpr = P % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if S + BITS <= 23:  # in place: mantissa bits S .. S+BITS-1
        src = _word(w0, w1, w2, WI)
        OFF: tl.constexpr = S
    elif S + BITS <= 32:  # high bits: from the word shifted down by 16
        src = _word(w0, w1, w2, WI) >> 16
        OFF: tl.constexpr = S - 16
    else:  # 3- and 6-bit codes that straddle two words
        src = (_word(w0, w1, w2, WI) >> S) | (_word(w0, w1, w2, WI + 1) << (32 - S))
        OFF: tl.constexpr = 0
    f = ((src & (MASK << OFF)) | ((150 - OFF) << 23)).to(tl.float32, bitcast=True)
    return f - (zf + (1 << (23 - OFF)))


@triton.jit
def gptq_gemv_kernel(x_ptr, qw_ptr, zf_ptr, sc_ptr, perm_ptr, y_ptr, part_ptr, cnt_ptr,
                     N, ROWS, rows_per_split, group_rows, stride_xm,
                     M: tl.constexpr, M_PAD: tl.constexpr, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_PERM: tl.constexpr, S_CHUNK: tl.constexpr,
                     PDL: tl.constexpr, F16X2: tl.constexpr, FLOAT_Z: tl.constexpr, ZROW: tl.constexpr = False,
                     SPAN: tl.constexpr = 0):
    """y[m, n] = sum over k of x[m, k] * W[n, k]; this program sums its K-slice (`splitk.finish`).

    FLOAT_Z (zeros that are not integers: a GGUF block minimum, ops/matmul/repack.py): the exponent
    trick subtracts no zero (it would round it to an integer), and the tile takes zero * sum(x) off
    instead, as the tl.dot kernel does: sum((c - z) x) = sum(c x) - z sum(x), one FMA per column.
    ZROW: zeros are one row [1, N] for every group (`one_zero_row`). SPAN (a group's row-groups, dividing BLOCK_R;
    0: a tile lies in one group): a tile holds BLOCK_R / SPAN groups (GGUF's 16 and 32 inputs), each row-group's sum
    kept apart and scaled by its own group. The groups' scales and zeros are loaded as [1, 1, BLOCK_N] rows, as
    without SPAN, and spread over the tile's rows in registers (a [1, BLOCK_R, BLOCK_N] load of them made Triton
    lay the whole tile out anew, through shared memory)."""
    WORDS: tl.constexpr = 1 if 32 % BITS == 0 else 3  # a row-group: one word, or 3 (32 codes at 3 bits, 16 at 6)
    PACK: tl.constexpr = 32 * WORDS // BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    ms = tl.arange(0, M_PAD)
    mmask = ms < M
    r_lo = pid_k * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, ROWS)
    # tiles are [1, BLOCK_R, BLOCK_N] (a leading axis for the activation rows), so the loads fix
    # one 3-D layout (4 columns a thread, every tile row in one thread) that all the math reuses
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    s_off = cols[None, None, :]
    c_ok = cmask[None, None, :]
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < r_hi
        lmask = r_ok[None, :, None] & c_ok
        wp = qw_ptr + (rows * WORDS).to(tl.int64)[None, :, None] * N + s_off
        w0 = tl.load(wp, mask=lmask, other=0).to(tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        if WORDS == 3:
            w1 = tl.load(wp + N, mask=lmask, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(wp + 2 * N, mask=lmask, other=0).to(tl.uint32, bitcast=True)
        if SPAN:  # each row-group's group's scale and zero: [1, BLOCK_R, BLOCK_N], built from the groups' rows
            s = tl.zeros((1, BLOCK_R, BLOCK_N), dtype=tl.float32)
            zf = tl.zeros((1, BLOCK_R, BLOCK_N), dtype=tl.float32)
            if ZROW:
                zf += tl.load(zf_ptr + s_off, mask=c_ok, other=0.0).to(tl.float32)
            for gi in tl.static_range(BLOCK_R // SPAN):
                g = r0 // SPAN + gi
                ok = c_ok & ((tl.zeros((1, 1, 1), tl.int32) + g * SPAN) < r_hi)  # the group's first row is ours
                mine = ((tl.arange(0, BLOCK_R) // SPAN) == gi)[None, :, None]
                s = tl.where(mine, tl.load(sc_ptr + g * N + s_off, mask=ok, other=0.0).to(tl.float32), s)
                if not ZROW:
                    zf = tl.where(mine, tl.load(zf_ptr + g * N + s_off, mask=ok, other=0.0).to(tl.float32), zf)
        else:  # the tile lies in one group: [1, 1, BLOCK_N]
            g = r0 // group_rows
            s = tl.load(sc_ptr + g * N + s_off, mask=c_ok, other=0.0).to(tl.float32)
            zf = tl.load(zf_ptr + (0 if ZROW else g * N) + s_off, mask=c_ok, other=0.0).to(tl.float32)
        if FLOAT_Z:  # the zero the unpack subtracts
            zc = zf * 0.0
        else:
            zc = zf
        pdl.wait(PDL)  # the first tile's weights are in flight; x is the previous kernel's output
        if F16X2:  # 4-bit, fp16 x, no perm: packed half2 math (f16x2.py); x read as words of two
            x32 = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
            xo = ms[:, None] * (stride_xm // 2) + rows[None, :] * 4  # [M_PAD, BLOCK_R]
            xm = mmask[:, None] & r_ok[None, :]
            x04, x15, x26, x37 = f16x2.pairs(tl.load(x32 + xo, mask=xm, other=0), tl.load(x32 + xo + 1, mask=xm, other=0),
                                             tl.load(x32 + xo + 2, mask=xm, other=0), tl.load(x32 + xo + 3, mask=xm, other=0))
            part = f16x2.dot8(w0.to(tl.int32, bitcast=True), x04[:, :, None], x15[:, :, None], x26[:, :, None],
                              x37[:, :, None], f16x2.splat(zc + 1024.0), f16x2.splat(-(zc + 64.0)))
            if SPAN:  # [M_PAD, BLOCK_R, BLOCK_N]: a sum per row-group, scaled below
                dot = part
            else:
                dot = tl.sum(part, axis=1, keep_dims=True)  # [M_PAD, 1, BLOCK_N]
            if FLOAT_Z:  # sum(x) through the same unpack: a word of eight codes 1
                ones = tl.full((1, 1, 1), 0x11111111, tl.int32)
                xs = f16x2.dot8(ones, x04[:, :, None], x15[:, :, None], x26[:, :, None], x37[:, :, None],
                                f16x2.splat(tl.full((1, 1, 1), 1024.0, tl.float32)),
                                f16x2.splat(tl.full((1, 1, 1), -64.0, tl.float32)))
                if SPAN:
                    dot -= xs * zf
                else:
                    dot -= tl.sum(xs, axis=1, keep_dims=True) * zf
            dot = dot * f16x2.X_SCALE
        else:
            DR: tl.constexpr = BLOCK_R if SPAN else 1  # SPAN: a sum per row-group, scaled below
            dot = tl.zeros((M_PAD, DR, BLOCK_N), dtype=tl.float32)
            xs = tl.zeros((M_PAD, DR, 1), dtype=tl.float32)
            for j in tl.static_range(PACK):
                q = _code_minus_zero(w0, w1, w2, zc, j, BITS)  # [1, BLOCK_R, BLOCK_N]
                k = rows * PACK + j
                if HAS_PERM:
                    k = tl.load(perm_ptr + k, mask=r_ok, other=0)
                # loaded 2-D, then broadcast: a 3-D load would repeat each value in all 4 column slots
                xj = tl.load(x_ptr + ms[:, None] * stride_xm + k[None, :],
                             mask=mmask[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
                if SPAN:
                    dot += q * xj[:, :, None]
                    if FLOAT_Z:
                        xs += xj[:, :, None]
                else:
                    dot += tl.sum(q * xj[:, :, None], axis=1, keep_dims=True)
                    if FLOAT_Z:
                        xs += tl.sum(xj[:, :, None], axis=1, keep_dims=True)
            if FLOAT_Z:
                dot -= xs * zf
        acc += tl.sum(dot * s, axis=1)
    pdl.wait(PDL)  # (a program with no tiles) before the partials and counters
    pdl.release(PDL)
    splitk.finish(acc, y_ptr, part_ptr, cnt_ptr, ms[:, None] * N + cols[None, :], mmask[:, None] & cmask[None, :],
                  pid_n, pid_k, tl.num_programs(1), M * N, S_CHUNK)


@triton.jit
def gptq_dequant_t_kernel(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, out_ptr, N, K, col0, band,
                          group_size, zero_offset, BITS: tl.constexpr, HAS_GIDX: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, FLOAT_Z: tl.constexpr,
                          ZROW: tl.constexpr = False):
    """out[k, c] = W[col0 + c, k] for a band of output columns: W.T, ready for x @ out. With FLOAT_Z
    qz_ptr is fp16 zeros [groups, N] (a GGUF minimum's, not integers) instead of packed qzeros; with ZROW
    as well, one row [1, N] of them for every group."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask = k < K
    cmask = c < band
    mask = kmask[:, None] & cmask[None, :]
    n = col0 + c
    pos = k * BITS
    word = pos // 32
    sh = (pos % 32).to(tl.uint32)[:, None]
    wp = qw_ptr + word.to(tl.int64)[:, None] * N + n[None, :]
    lo = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True)
    hi = lo
    if 32 % BITS != 0:
        words = (K * BITS) // 32
        hi = tl.load(wp + N, mask=mask & (word + 1 < words)[:, None], other=0).to(tl.uint32, bitcast=True)
    q = stream_code(lo, hi, sh, BITS)
    if HAS_GIDX:
        g = tl.load(gidx_ptr + k, mask=kmask, other=0)
    else:
        g = k // group_size
    if FLOAT_Z:
        if ZROW:
            z = tl.load(qz_ptr + n[None, :] + g[:, None] * 0, mask=mask, other=0.0).to(tl.float32)
        else:
            z = tl.load(qz_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        zwords = (N * BITS) // 32
        zpos = n * BITS
        zword = zpos // 32
        zsh = (zpos % 32).to(tl.uint32)[None, :]
        zp = qz_ptr + g[:, None] * zwords + zword[None, :]
        zlo = tl.load(zp, mask=mask, other=0).to(tl.uint32, bitcast=True)
        zhi = zlo
        if 32 % BITS != 0:
            zhi = tl.load(zp + 1, mask=mask & (zword + 1 < zwords)[None, :], other=0).to(tl.uint32, bitcast=True)
        z = (stream_code(zlo, zhi, zsh, BITS) + zero_offset).to(tl.float32)
    s = tl.load(sc_ptr + g[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + k.to(tl.int64)[:, None] * band + c[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- load time


def gemv_tile_rows(bits: int, group_size: int, in_features: int, target: int = 16) -> int | None:
    """BLOCK_R: row-groups per GEMV tile (a power of two <= target dividing the group), or None where
    a group is not a whole number of row-groups (then only the dequantize path serves the layer)."""
    pack, _ = pack_shape(bits)
    if in_features % pack:
        return None
    if gptq_groups(in_features, group_size) == 1:
        return target
    if group_size % pack:
        return None
    group_rows = group_size // pack
    r = 1
    while r * 2 <= target and group_rows % (r * 2) == 0:
        r *= 2
    return r


def unpack_codes(qweight: torch.Tensor, bits: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ qweight int32 [K * bits / 32, N] -> codes int32 [len(rows) or K, N] (rows: input features)."""
    k = qweight.shape[0] * 32 // bits
    rows = torch.arange(k, device=qweight.device) if rows is None else rows.to(qweight.device).long()
    pos = rows * bits
    word, sh = pos // 32, (pos % 32)[:, None]
    lo = qweight.index_select(0, word).long() & 0xFFFFFFFF
    if 32 % bits:
        nxt = (word + 1).clamp(max=qweight.shape[0] - 1)
        lo = lo | ((qweight.index_select(0, nxt).long() & 0xFFFFFFFF) << 32)
    return ((lo >> sh) & ((1 << bits) - 1)).to(torch.int32)


def sort_act_order(qweight: torch.Tensor, g_idx: torch.Tensor, bits: int, group_size: int,
                   band: int = 4096) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sort K by group: (qweight with rows in sorted order, perm int32 [K]) with sorted row i = input
    feature perm[i]; None where the sorted groups are not the plain layout k // group_size (a
    checkpoint with uneven groups: served by the dequantize path). Works in column bands."""
    k = g_idx.numel()
    g = g_idx.long()
    perm = torch.argsort(g, stable=True)
    plain = torch.arange(k, device=g.device) // (group_size if gptq_groups(k, group_size) > 1 else k)
    if not torch.equal(g[perm], plain):
        return None
    out = torch.empty_like(qweight)
    for c0 in range(0, qweight.shape[1], band):
        c1 = min(qweight.shape[1], c0 + band)
        out[:, c0:c1] = pack_codes(unpack_codes(qweight[:, c0:c1], bits, perm), bits)
    return out, perm.to(torch.int32)


def float_zeros(qzeros: torch.Tensor, bits: int, zero_offset: int) -> torch.Tensor:
    """qzeros int32 [groups, N * bits / 32] -> zero + offset as fp16 [groups, N] (exact: <= 256).

    The GEMV reads these rather than qzeros: a contiguous load along N keeps every operand of the
    tile in the weights' register layout (a packed gather did not, and Triton then moved the whole
    code tile through shared memory). They cost as much memory as the scales.
    """
    n = qzeros.shape[1] * 32 // bits
    z = unpack_codes(qzeros.t().contiguous(), bits)  # [N, groups]
    return (z.t() + zero_offset).to(torch.float16).contiguous().reshape(-1, n)


def prepare(module) -> dict:
    """Launch facts for a GPTQ QuantLinear (cached on it as `_gptq_kernel`), and its GEMV buffers.

    Registers `gptq_zeros` (`float_zeros`, one row where the layer has one zero a column: `one_zero_row`);
    where g_idx scatters the groups, sorts qweight in place and registers `gptq_perm` (see the module
    docstring); a g_idx that is already k // group_size is ignored by the GEMV. Layers the GEMV cannot
    serve get no buffers (block_r None). The facts also hold the tl.dot kernel's BLOCK_K
    (`gptq_mma.mma_block_k`, None where it cannot serve the layer) and the compute capability of the
    module's device (None for the CPU).
    """
    facts = getattr(module, "_gptq_kernel", None)
    if facts is not None:
        return facts
    bits, gs = module._gptq["bits"], module._gptq["group_size"]
    k = module.in_features
    block_r = gemv_tile_rows(bits, gs, k)
    sorted_layout = False
    if block_r is not None and module.g_idx is not None:
        plain = torch.arange(k, device=module.g_idx.device) // (gs if gptq_groups(k, gs) > 1 else k)
        if not torch.equal(module.g_idx.long(), plain):
            res = sort_act_order(module.qweight, module.g_idx, bits, gs)
            if res is None:
                block_r = None
            else:
                module.qweight = res[0]  # the stored codes, replaced: held once
                module.g_idx = None
                module.register_buffer("gptq_perm", res[1])
                sorted_layout = True
    if block_r is not None and module.qzeros is not None:  # (a layer without qzeros holds gptq_zeros already)
        zeros = float_zeros(module.qzeros, bits, module._gptq["zero_offset"])
        module.register_buffer("gptq_zeros", one_zero_row(zeros, module.scales))
    mma_block_k = None if block_r is None else gptq_mma.mma_block_k(bits, gs, k)
    facts = {"block_r": block_r, "sorted": sorted_layout, "mma_block_k": mma_block_k,
             "capability": hardware.compute_capability(module.qweight.device)}
    module._gptq_kernel = facts
    return facts


# ---------------------------------------------------------------- run time


def launch_params(n: int, k: int, bits: int, group_block_r: int, m: int = 1,
                  num_warps: int | None = None, split: int | None = None,
                  block_r: int | None = None, half2: bool = False, span: bool = False) -> dict[str, int]:
    """BLOCK_N / BLOCK_R / num_warps / split for one shape.

    Each thread loads 16 bytes (4 columns) of every tile row, so BLOCK_N = 128 * num_warps keeps a
    tile row in one thread and the K reduction in registers. The activation slice [M_PAD, BLOCK_R]
    must have fewer elements than the program has threads, or Triton routes it through shared memory
    every code step (checked in the compiled PTX: bar.sync appears), so BLOCK_R shrinks as M grows.
    Tiles hold at most GEMV_TILE_ROWS row-groups. Then K is split until about TARGET_PROGRAMS
    programs run, and into at least MIN_SPLIT parts (HALF2_TILE_ROWS at one row / HALF2_MIN_SPLIT for
    the half2 unpack). block_r (at most the group's) overrides the tile cap (the benchmarks sweep it). span: tiles
    may hold several groups (the kernel's SPAN), so the cap, not the group, bounds them.
    """
    m_pad = triton.next_power_of_2(m)
    num_warps = num_warps or GEMV_NUM_WARPS
    cap = (HALF2_TILE_ROWS if half2 and m_pad == 1 else GEMV_TILE_ROWS) if block_r is None else block_r
    br = max(group_block_r, cap) if span else group_block_r
    while br > 1 and m_pad * br >= 32 * num_warps:
        br //= 2
    br = max(1, min(br, cap))
    block_n = 128 * num_warps
    pack, _ = pack_shape(bits)
    tiles = triton.cdiv(k // pack, br)
    n_blocks = triton.cdiv(n, block_n)
    split = max(1, min(tiles, split or max(HALF2_MIN_SPLIT if half2 else MIN_SPLIT, TARGET_PROGRAMS // n_blocks)))
    rows_per_split = triton.cdiv(tiles, split) * br
    return {"BLOCK_N": block_n, "BLOCK_R": br, "num_warps": num_warps,
            "split": triton.cdiv(k // pack, rows_per_split), "rows_per_split": rows_per_split}


def gptq_gemv(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
              perm: torch.Tensor | None, bits: int, group_size: int, block_r: int,
              *, num_warps: int | None = None, split: int | None = None, x_perm: str = "kernel",
              tile_r: int | None = None, half2: bool | None = None, float_z: bool = False,
              span: bool | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W.T (meant for M <= MAX_M), x with unit stride along K; in x's dtype.

    qweight must have its groups contiguous: stored without act-order, or `sort_act_order`'s output
    with its perm. zeros are `float_zeros` (fp16 [groups, N], offset included), scales fp16 [groups, N]
    (an int16 view is accepted), or with float_z a GGUF minimum's zeros as they are (not integers);
    block_r is `gemv_tile_rows`. num_warps / split / tile_r override
    `launch_params` (the benchmarks sweep them); x_perm "torch" gathers x's columns first. half2
    (default: wherever `uses_half2` allows) picks the packed-half2 unpack (f16x2.py); span (default SPAN_GROUPS)
    lets a tile hold several groups.
    """
    m, k = x.shape
    n = qweight.shape[1]
    assert m >= 1 and x.stride(1) == 1, (tuple(x.shape), x.stride())
    can = uses_half2(x, bits, None if x_perm == "torch" else perm)
    assert not half2 or can, "the half2 unpack needs 4-bit codes, fp16 x on CUDA in 4-byte words, no perm"
    half2 = can if half2 is None else half2
    pack, _ = pack_shape(bits)
    rows = k // pack
    group_rows = rows if gptq_groups(k, group_size) == 1 else group_size // pack
    span = (SPAN_GROUPS if span is None else span) and gptq_groups(k, group_size) > 1
    p = launch_params(n, k, bits, block_r, m, num_warps, split, tile_r, half2, span)
    span = span and group_rows % p["BLOCK_R"] != 0  # a tile holds several groups
    if span and p["BLOCK_R"] % group_rows:  # ... but not whole ones: the group's own tiles
        p, span = launch_params(n, k, bits, block_r, m, num_warps, split, tile_r, half2), False
    if perm is not None and x_perm == "torch":
        x, perm = x.index_select(1, perm.long()), None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = p["split"]
    grid = (triton.cdiv(n, p["BLOCK_N"]), split)
    m_pad = triton.next_power_of_2(m)
    gptq_gemv_kernel[grid](x, qweight, zeros, scales.view(torch.float16), x if perm is None else perm, y,
                           splitk.workspace(split, m, n, x.device), splitk.counters(x.device, grid[0]),
                           n, rows, p["rows_per_split"], group_rows, x.stride(0),
                           M=m, M_PAD=m_pad, BITS=bits, BLOCK_R=p["BLOCK_R"],
                           BLOCK_N=p["BLOCK_N"], HAS_PERM=perm is not None,
                           S_CHUNK=splitk.chunk(m_pad * p["BLOCK_N"] // (32 * p["num_warps"])),
                           num_warps=p["num_warps"], F16X2=half2, FLOAT_Z=float_z,
                           ZROW=zero_row(zeros, k, group_size), SPAN=group_rows if span else 0,
                           **pdl.launch(x.device, m))
    return y


def uses_half2(x: torch.Tensor, bits: int, perm: torch.Tensor | None) -> bool:
    """Whether the GEMV can take the packed-half2 unpack: 4-bit codes, fp16 activations on CUDA (not the
    interpreter: it is inline PTX) whose rows start on 4-byte boundaries, and no act-order gather."""
    return (bits == 4 and x.dtype == torch.float16 and x.is_cuda and perm is None
            and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0)


def dequantize_t(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 bits: int, group_size: int, zero_offset: int, col0: int, col1: int,
                 dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W.T [K, col1 - col0] for output columns [col0, col1), from the stored tensors (any g_idx).
    qzeros: packed int32 [groups, N * bits / 32], or fp16 float zeros [groups, N] (or [1, N]: `one_zero_row`)."""
    k = qweight.shape[0] * 32 // bits
    n = qweight.shape[1]
    band = col1 - col0
    out = torch.empty((k, band), dtype=dtype, device=qweight.device)
    if band == 0:
        return out
    gs = group_size if gptq_groups(k, group_size) > 1 else k
    block_k, block_n = 32, 128
    grid = (triton.cdiv(k, block_k), triton.cdiv(band, block_n))
    gptq_dequant_t_kernel[grid](qweight, qzeros, scales.view(torch.float16), qweight if g_idx is None else g_idx,
                                out, n, k, col0, band, gs, zero_offset, BITS=bits, HAS_GIDX=g_idx is not None,
                                BLOCK_K=block_k, BLOCK_N=block_n, FLOAT_Z=qzeros.dtype == torch.float16,
                                ZROW=qzeros.dtype == torch.float16 and zero_row(qzeros, k, group_size), num_warps=4)
    return out


def uses_mma(m: int, dtype: torch.dtype, facts: dict, capability: tuple[int, int] | None) -> bool:
    """Whether `gptq_matmul` sends M rows to the tl.dot kernel: MMA_FROM_M <= M <= MMA_MAX_M, fp16 /
    bf16 activations, a layer it can serve, and compute capability >= 8.0 (tensor-core mma; below it
    Triton's tl.dot is FMAs, and the GEMV or dequantize + cuBLAS is faster)."""
    return (MMA_FROM_M <= m <= gptq_mma.MMA_MAX_M and dtype in (torch.float16, torch.bfloat16)
            and facts["mma_block_k"] is not None and capability is not None and tuple(capability) >= (8, 0))


def uses_qmma(m: int, x: torch.Tensor, module, facts: dict, capability: tuple[int, int] | None) -> bool:
    """Whether M rows go to the mma.sync kernel: M >= QMMA_FROM_M, CUDA, a layer `qmma.serves`, NVRTC here."""
    return (QMMA_FROM_M <= m <= qmma.ROUTE_MAX_M and x.is_cuda and facts["block_r"] is not None
            and qmma.serves(m, module.in_features, module.out_features, module._gptq["bits"],
                            module._gptq["group_size"], x.dtype, capability, facts["sorted"])
            and qmma.usable())


def gptq_matmul(x: torch.Tensor, module, capability: tuple[int, int] | None = None) -> torch.Tensor:
    """The QuantLinear hook: x [..., K] -> [..., N] in x's dtype (bias is the module's business).

    capability overrides the module device's compute capability (tests on the CPU pass one).
    """
    facts = prepare(module)
    g = module._gptq
    n, k = module.out_features, module.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    perm = module.gptq_perm if facts["sorted"] else None
    cap = facts["capability"] if capability is None else capability
    if uses_qmma(m, x2, module, facts, cap):
        try:
            return qmma.qmma(x2, module.qweight, module.gptq_zeros, module.scales, g["bits"], g["group_size"],
                             cap).reshape(*lead, n)
        except nvrtc.BuildError as e:  # e.g. a driver too old for the image: the Triton kernels below
            qmma.disable(str(e))
    mma = uses_mma(m, x2.dtype, facts, cap)
    if m <= MAX_M and facts["block_r"] is not None and not mma:
        y = gptq_gemv(x2, module.qweight, module.gptq_zeros, module.scales, perm, g["bits"], g["group_size"],
                      facts["block_r"], float_z=module.qzeros is None)
        return y.reshape(*lead, n)
    if mma:
        y = gptq_mma.gptq_mma(x2, module.qweight, module.gptq_zeros, module.scales, perm, g["bits"], g["group_size"],
                              facts["mma_block_k"])
        return y.reshape(*lead, n)
    if perm is not None:  # W.T's rows come out in sorted-K order
        x2 = x2.index_select(1, perm.long())
    zeros = module.gptq_zeros if module.qzeros is None else module.qzeros
    y = banded_matmul(x2, n, PREFILL_BAND_ELEMS,
                      lambda c0, c1: dequantize_t(module.qweight, zeros, module.scales, module.g_idx,
                                                  g["bits"], g["group_size"], g["zero_offset"], c0, c1, x2.dtype))
    return y.reshape(*lead, n)
