"""Triton kernels over EXL2 tensors: a split-K decode GEMV and a prefill dequantizer.

EXL2 (lowgear/quant/exl2.py has the format) packs each output column as one little-end bit stream
per group along the input dim, in act-order (packed row k holds input row perm[k]), with a bit
width per group (8, 6, 5, 4, 3 or 2). Inside a group the width is uniform, so the GEMV
(y[M, N] = x[M, K] @ W.T, M <= MAX_M) walks its groups and branches once per group, on the
group's runtime bit width, into a loop specialised for that width (`_group_dot`, BITS constexpr).
The unit of that loop is a row-group: the fewest rows that fill whole words (16 rows in one word
at 2 bits, 8 at 4, 4 at 8; 32 rows in 3 words at 3 bits, 5 words at 5; 16 rows in 3 words at 6).
A converter's group is always a whole number of row-groups (rows * bits / 32 packed rows), so
tiles never straddle groups and need no row mask. A 3/5/6-bit code that straddles two words is
joined from both at a compile-time position; every other code is masked in place.

Codes become floats as in the GPTQ GEMV (gptq.py): a code masked in place at bit `off` and OR-ed
with the exponent of 2**(23 - off) is the float 2**(23 - off) + code, and one subtraction of the
constant 2**(23 - off) + 2**(bits - 1) centres it; no int->float cvt per code. A program owns
BLOCK_N = 128 * num_warps columns (one 16-byte load per thread per word row) and a range of whole
groups; per group it sums codes times x over the group's rows, then multiplies by the group's
scale. Split-K partial sums go to an fp32 workspace and the last program of each column block adds
them in split order (`splitk.py`: one launch, deterministic). The split is balanced by packed words (an 8-bit group costs four
times a 2-bit one), computed at load time for the two launch widths.

Scales. The kernel computes fp16((s + 1)^2 * fp16(q_scale_max / 256)) per group and column from
the 4-bit code s, with the same two fp16 roundings as `scales_exl2`, so results match the torch
path exactly. It reads the codes from `exl2_scale_codes`, one uint8 per (group, column), not from
q_scale's nibbles: a gather of q_scale words (8 columns a word) loads in a layout of its own, and
Triton then moved each group's partial sums through shared memory (12-84 bar.sync in the sm_75 PTX
of the GEMV, against none with the contiguous byte load that keeps the weights' register layout;
gptq.py's `float_zeros` met the same). The bytes cost 8 / group_rows bits per weight (0.25 at
ExLlamaV2's smallest, 32-row groups; the fixtures' groups have 32-128 rows), half of what
decoded fp16 scales would.

Act-order: x's columns are gathered through perm once per call by torch (`x.index_select(1,
perm)`, M * K elements against K * N * bpw / 8 bytes of weights), so the hot loop reads x
contiguously and needs no per-code index load; the same gathered x serves the prefill path, whose
dequantized W.T is written in packed row order.

Load time (`prepare`) registers small buffers beside the stored ones, which it leaves unchanged:
`exl2_groups` (int32 [groups, 4]: bits, first packed row, first packed-order input row, packed
rows), `exl2_scale_codes` (uint8 [groups, width]), `exl2_smax` (fp16(q_scale_max / 256)
[groups], held as int16 bits so that `.to(dtype)` cannot round it), `exl2_perm` (int32 [K],
absent without q_invperm) and `exl2_splits2` / `exl2_splits4` (int32: first group of each
split, for 2 and 4 warps).

Prefill (M > MAX_M) is compute-bound: `dequantize_t` writes W.T for a band of
columns in the activation dtype (one program per group and column block, a 64-bit window with a
runtime bit width) and torch.matmul (cuBLAS) does the rest. No kernel here uses tl.dot.
"""

from __future__ import annotations

import bisect
import math

import torch
import triton
import triton.language as tl

from ...formats.dequant import banded_matmul
from ...formats.exl2 import group_table
from .. import pdl
from . import splitk

# GEMV up to this many activation rows; past it, dequantize + cuBLAS (as the GPTQ GEMV, whose
# per-code work is the same; why: docs/decisions/004-gemv-row-limits.md)
MAX_M = 8
# temporary bound for the prefill path: columns per band so that K * band <= this
PREFILL_BAND_ELEMS = 1 << 24
# programs to aim for when picking split-K: a few per SM of an H100 (132 SMs); fewer SMs just queue
TARGET_PROGRAMS = 4 * 132
# most words per column a GEMV tile loads (registers: 4 columns a thread)
TILE_WORDS = 8
# the launch widths the GEMV uses (num_warps); a split table is prepared for each
WARPS = (2, 4)


def row_group(bits: int) -> tuple[int, int]:
    """(rows, int32 words) of the smallest whole-word run of `bits`-bit codes."""
    words = bits // math.gcd(bits, 32)
    return 32 * words // bits, words


def launch_warps(m: int) -> int:
    return 2 if triton.next_power_of_2(m) <= 2 else 4


@triton.jit
def _pick(w0, w1, w2, w3, w4, I: tl.constexpr):
    if I == 0:
        r = w0
    elif I == 1:
        r = w1
    elif I == 2:
        r = w2
    elif I == 3:
        r = w3
    else:
        r = w4
    return r


@triton.jit
def _centred_code(w0, w1, w2, w3, w4, J: tl.constexpr, BITS: tl.constexpr):
    """code J of each row-group minus 2**(BITS - 1), as fp32 through the exponent trick."""
    P: tl.constexpr = J * BITS
    WI: tl.constexpr = P // 32
    S: tl.constexpr = P % 32
    MASK: tl.constexpr = (1 << BITS) - 1
    if S + BITS <= 23:  # in place: mantissa bits S .. S+BITS-1
        src = _pick(w0, w1, w2, w3, w4, WI)
        OFF: tl.constexpr = S
    elif S + BITS <= 32:  # high bits: from the word shifted down by 16
        src = _pick(w0, w1, w2, w3, w4, WI) >> 16
        OFF: tl.constexpr = S - 16
    else:  # a 3-, 5- or 6-bit code that straddles two words
        src = (_pick(w0, w1, w2, w3, w4, WI) >> S) | (_pick(w0, w1, w2, w3, w4, WI + 1) << (32 - S))
        OFF: tl.constexpr = 0
    f = ((src & (MASK << OFF)) | ((150 - OFF) << 23)).to(tl.float32, bitcast=True)
    return f - ((1 << (23 - OFF)) + (1 << (BITS - 1)))


@triton.jit
def _scales(sc_ptr, g, N, smax, cols, cmask):
    """fp16((s + 1)^2 * smax) as fp32 for group g, shaped as cols (the caller's tile layout: the
    codes' contiguous load keeps it, so no layout conversion follows); smax is fp16(q_scale_max / 256)."""
    s1 = tl.load(sc_ptr + g * N + cols, mask=cmask, other=0).to(tl.int32) + 1
    return ((s1 * s1).to(tl.float32) * smax).to(tl.float16).to(tl.float32)


@triton.jit
def _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
               cols, cmask, ms, mmask,
               BITS: tl.constexpr, R: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + scale * sum over group g's rows of x[m, k] * (code - zero), tiles of R row-groups."""
    WORDS: tl.constexpr = 1 if 32 % BITS == 0 else (5 if BITS == 5 else 3)
    PACK: tl.constexpr = 32 * WORDS // BITS
    s_off = cols[None, None, :]
    c_ok = cmask[None, None, :]
    rg = tl.arange(0, R)
    dot = tl.zeros((M_PAD, 1, BLOCK_N), dtype=tl.float32)
    for t in range(0, n_words, R * WORDS):
        # [1, R, BLOCK_N] tiles: one 3-D layout for the loads and all the math (as in gptq.py)
        wp = qw_ptr + (word0 + t + rg * WORDS).to(tl.int64)[None, :, None] * N + s_off
        w0 = tl.load(wp, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
        w1 = w0
        w2 = w0
        w3 = w0
        w4 = w0
        if WORDS >= 3:
            w1 = tl.load(wp + N, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
            w2 = tl.load(wp + 2 * N, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
        if WORDS == 5:
            w3 = tl.load(wp + 3 * N, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
            w4 = tl.load(wp + 4 * N, mask=c_ok, other=0).to(tl.uint32, bitcast=True)
        kb = k0 + (t // WORDS + rg) * PACK
        for j in tl.static_range(PACK):
            q = _centred_code(w0, w1, w2, w3, w4, j, BITS)  # [1, R, BLOCK_N]
            # loaded 2-D, then broadcast: a 3-D load would repeat each value in all 4 column slots
            xj = tl.load(x_ptr + ms[:, None] * stride_xm + (kb + j)[None, :],
                         mask=mmask[:, None], other=0.0).to(tl.float32)
            dot += tl.sum(q * xj[:, :, None], axis=1, keep_dims=True)
    s = _scales(sc_ptr, g, N, smax, s_off, c_ok)  # [1, 1, BLOCK_N]
    return acc + tl.sum(dot * s, axis=1)


@triton.jit
def exl2_gemv_kernel(x_ptr, qw_ptr, sc_ptr, tab_ptr, smax_ptr, split_ptr, y_ptr, part_ptr, cnt_ptr,
                     N, N_OUT,  stride_xm,
                     M: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                     R2: tl.constexpr, R3: tl.constexpr, R4: tl.constexpr, R5: tl.constexpr,
                     R6: tl.constexpr, R8: tl.constexpr, S_CHUNK: tl.constexpr, PDL: tl.constexpr):
    """y[m, n] = sum over k of x_perm[m, k] * W[n, perm[k]]; this program sums its groups (`splitk.finish`)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N_OUT
    # loads are masked by the padded width (a multiple of 32), so they stay 16-byte vectors where
    # out_features is not (a 32001 vocabulary); the store by out_features (for such a layer the
    # store's own layout costs one shared-memory conversion per program, after the loop)
    wmask = cols < N
    ms = tl.arange(0, M_PAD)
    mmask = ms < M
    g_lo = tl.load(split_ptr + pid_k)
    g_hi = tl.load(split_ptr + pid_k + 1)
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    pdl.wait(PDL)
    for g in range(g_lo, g_hi):
        bits = tl.load(tab_ptr + g * 4)
        word0 = tl.load(tab_ptr + g * 4 + 1)
        k0 = tl.load(tab_ptr + g * 4 + 2)
        n_words = tl.load(tab_ptr + g * 4 + 3)
        smax = tl.load(smax_ptr + g).to(tl.float32)
        if bits == 4:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 4, R4, M_PAD, BLOCK_N)
        elif bits == 2:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 2, R2, M_PAD, BLOCK_N)
        elif bits == 3:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 3, R3, M_PAD, BLOCK_N)
        elif bits == 5:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 5, R5, M_PAD, BLOCK_N)
        elif bits == 6:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 6, R6, M_PAD, BLOCK_N)
        else:
            acc = _group_dot(acc, x_ptr, qw_ptr, sc_ptr, g, word0, k0, n_words, smax, N, stride_xm,
                             cols, wmask, ms, mmask, 8, R8, M_PAD, BLOCK_N)
    pdl.release(PDL)
    splitk.finish(acc, y_ptr, part_ptr, cnt_ptr, ms[:, None] * N_OUT + cols[None, :],
                  mmask[:, None] & cmask[None, :], pid_n, pid_k, tl.num_programs(1), M * N_OUT, S_CHUNK)


@triton.jit
def exl2_dequant_t_kernel(qw_ptr, sc_ptr, tab_ptr, smax_ptr, out_ptr, N, col0, band,
                          BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[k, c] = W[col0 + c, perm[k]] for group program_id(0)'s packed rows k: W.T in packed order."""
    g = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < band
    n = col0 + c
    bits = tl.load(tab_ptr + g * 4)
    word0 = tl.load(tab_ptr + g * 4 + 1)
    k0 = tl.load(tab_ptr + g * 4 + 2)
    rows = tl.load(tab_ptr + g * 4 + 3) * 32 // bits
    smax = tl.load(smax_ptr + g).to(tl.float32)
    s = _scales(sc_ptr, g, N, smax, n[None, :], cmask[None, :])  # [1, BLOCK_N]
    code_mask = ((1 << bits) - 1).to(tl.uint32)
    zero = 1 << (bits - 1)
    for r0 in range(0, rows, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        mask = (r < rows)[:, None] & cmask[None, :]
        pos = r * bits
        sh = pos % 32
        straddle = (sh + bits > 32)[:, None]
        wp = qw_ptr + (word0 + pos // 32).to(tl.int64)[:, None] * N + n[None, :]
        lo = tl.load(wp, mask=mask, other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(wp + N, mask=mask & straddle, other=0).to(tl.uint32, bitcast=True)
        shu = sh.to(tl.uint32)[:, None]
        v = (lo >> shu) | tl.where(straddle, hi << ((32 - shu) & 31), 0)
        q = (v & code_mask).to(tl.int32) - zero
        w = q.to(tl.float32) * s
        tl.store(out_ptr + (k0 + r).to(tl.int64)[:, None] * band + c[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=mask)


# ---------------------------------------------------------------- load time


def tile_row_groups(counts: list[int], bits: int) -> int:
    """R for one bit width: the largest power of two that divides every group's row-group count and
    keeps a tile within TILE_WORDS words per column."""
    _, words = row_group(bits)
    r = 1
    while r * 2 * words <= TILE_WORDS and all(c % (r * 2) == 0 for c in counts):
        r *= 2
    return r


def split_groups(words: list[int], splits: int) -> list[int]:
    """First group of each split (and the group count last), balanced by packed words; no empty split."""
    cum = [0]
    for w in words:
        cum.append(cum[-1] + w)
    starts = []
    for s in range(splits):
        g = bisect.bisect_left(cum, -(-s * cum[-1] // splits))  # first g with cum[g] >= s / splits of all
        if g < len(words) and (not starts or g > starts[-1]):
            starts.append(g)
    return starts + [len(words)]


def prepare(module) -> dict:
    """Launch facts for an EXL2 QuantLinear (cached on it as `_exl2_kernel`), and its kernel buffers
    (see the module docstring). Reads q_groups on the host once, at load."""
    facts = getattr(module, "_exl2_kernel", None)
    if facts is not None:
        return facts
    device = module.qweight.device
    table = group_table(module.q_groups.cpu(), int(module.qweight.shape[0]))
    rows = [r for _, _, r in table]
    k0 = [sum(rows[:g]) for g in range(len(rows))]
    words = [r * b // 32 for b, _, r in table]
    tab = [[b, start, k, w] for (b, start, _), k, w in zip(table, k0, words)]
    module.register_buffer("exl2_groups", torch.tensor(tab, dtype=torch.int32, device=device))
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=device)
    codes = (module.q_scale[:, :, None] >> shifts) & 15  # [groups, width / 8, 8]: column 8 * w + j
    module.register_buffer("exl2_scale_codes", codes.reshape(len(table), -1).to(torch.uint8))
    smax = (module.q_scale_max.view(torch.float16).float() / 256).half()
    module.register_buffer("exl2_smax", smax.view(torch.int16).to(device))
    if module.q_invperm is not None:
        inv = module.q_invperm.long()
        inv = inv & 0xFFFF if module.q_invperm.dtype == torch.int16 else inv
        module.register_buffer("exl2_perm", torch.argsort(inv).to(torch.int32))
    r = {}
    for bits in (2, 3, 4, 5, 6, 8):
        counts = [w // row_group(bits)[1] for (b, _, _), w in zip(table, words) if b == bits]
        r[bits] = tile_row_groups(counts, bits)
    splits = {}
    n_out = module.out_features
    for warps in WARPS:
        n_blocks = triton.cdiv(n_out, 128 * warps)
        starts = split_groups(words, max(1, min(len(words), TARGET_PROGRAMS // n_blocks)))
        module.register_buffer(f"exl2_splits{warps}", torch.tensor(starts, dtype=torch.int32, device=device))
        splits[warps] = len(starts) - 1
    facts = {"R": r, "splits": splits, "has_perm": module.q_invperm is not None}
    module._exl2_kernel = facts
    return facts


# ---------------------------------------------------------------- run time


def exl2_gemv(x: torch.Tensor, module, *, num_warps: int | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W[:, perm].T: x already in packed order (`exl2_matmul` gathers it), unit
    stride along K, M <= MAX_M; in x's dtype. num_warps (2 or 4) overrides the launch width."""
    facts = prepare(module)
    m, _ = x.shape
    assert 1 <= m and x.stride(1) == 1, (tuple(x.shape), x.stride())
    warps = num_warps or launch_warps(m)
    n_out, width = module.out_features, int(module.qweight.shape[1])
    split = facts["splits"][warps]
    r = facts["R"]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    block_n = 128 * warps
    grid = (triton.cdiv(n_out, block_n), split)
    m_pad = triton.next_power_of_2(m)
    exl2_gemv_kernel[grid](x, module.qweight, module.exl2_scale_codes, module.exl2_groups,
                           module.exl2_smax.view(torch.float16), getattr(module, f"exl2_splits{warps}"), y,
                           splitk.workspace(split, m, n_out, x.device), splitk.counters(x.device, grid[0]),
                           width, n_out, x.stride(0),
                           M=m, M_PAD=m_pad, BLOCK_N=block_n, R2=r[2], R3=r[3], R4=r[4],
                           R5=r[5], R6=r[6], R8=r[8], S_CHUNK=splitk.chunk(m_pad * block_n // (32 * warps)),
                           num_warps=warps, **pdl.launch(x.device, m))
    return y


def dequantize_t(module, col0: int, col1: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W[col0:col1, perm].T [K, col1 - col0]: a band of output columns, input rows in packed order."""
    prepare(module)
    k, width = module.in_features, int(module.qweight.shape[1])
    band = col1 - col0
    out = torch.empty((k, band), dtype=dtype, device=module.qweight.device)
    if band == 0:
        return out
    block_k, block_n = 32, 128
    grid = (module.exl2_groups.shape[0], triton.cdiv(band, block_n))
    exl2_dequant_t_kernel[grid](module.qweight, module.exl2_scale_codes, module.exl2_groups,
                                module.exl2_smax.view(torch.float16), out, width, col0, band,
                                BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out


def exl2_matmul(x: torch.Tensor, module) -> torch.Tensor:
    """The QuantLinear hook: x [..., K] -> [..., N] in x's dtype (bias is the module's business)."""
    facts = prepare(module)
    n, k = module.out_features, module.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty((*lead, n))
    if facts["has_perm"]:
        x2 = x2.index_select(1, module.exl2_perm)  # packed (act-) order, contiguous
    elif x2.stride(1) != 1:
        x2 = x2.contiguous()
    if m <= MAX_M:
        return exl2_gemv(x2, module).reshape(*lead, n)
    y = banded_matmul(x2, n, PREFILL_BAND_ELEMS, lambda c0, c1: dequantize_t(module, c0, c1, x2.dtype))
    return y.reshape(*lead, n)
