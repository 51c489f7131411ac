"""ops/matmul/repack.py: GGUF layers held as GPTQ tensors, against gguf-py's own dequantizer.

The reference is `gguf.quants.dequantize` (llama.cpp's Python package) on the same bytes, so it
shares no code with lowgear. Q4_0 / Q8_0's GPTQ form must give the same weights bit for bit (float64
dequantization of both); the float-zero types (Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) within the fp16
rounding of their group's scale and zero. The module must keep answering as a layer of its GGUF
type (qtype, lookup rows for a tied embedding, the torch path), and the kernel hook it gets must be
the GPTQ one, matching the float64 matmul on every path: the GEMV, the tl.dot kernel and the prefill
dequantizer. Kernels run in Triton's interpreter without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from helpers import interpreter_index_shim

from lowgear.model.linear import QuantLinear
from lowgear.formats.gptq import dequantize_gptq
from lowgear.ops.matmul import repack
from lowgear.ops.matmul.repack import gguf_to_gptq
from lowgear.formats.spec import PackedTensor

pytest.importorskip("triton")

from lowgear.ops import matmul as kernels
from lowgear.ops.matmul import gptq_gemv as G

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QTYPES = ["Q4_0", "Q8_0"]
FLOAT_ZERO = ["Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_numpy_shim():
    with interpreter_index_shim():
        yield


def layer_bytes(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes [n, row_bytes] from gguf-py's quantizer on random weights, their float64 values)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.005, 0.05, (n, 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    data = quants.quantize(w, GGMLQuantizationType[qtype])
    ref = quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    return data, ref


@pytest.mark.parametrize("qtype", QTYPES)
def test_gptq_form_is_the_same_weights(qtype, monkeypatch):
    monkeypatch.setattr(repack, "BAND", 16)  # 72 columns: four whole bands and a part
    data, ref = layer_bytes(qtype, 72, 96, seed=1)
    w = gguf_to_gptq(qtype, torch.from_numpy(data), 96)
    assert (w.bits, w.group_size, w.sym, w.zero_offset, w.g_idx) == ((4 if qtype == "Q4_0" else 8), 32, True, 0,
                                                                      None)
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), torch.from_numpy(ref), rtol=0, atol=0)


@pytest.mark.parametrize("qtype", QTYPES)
def test_module_switches_to_the_gptq_kernel_and_keeps_its_answers(qtype):
    n, k = 72, 160
    data, ref = layer_bytes(qtype, n, k, seed=2)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, k))).to(DEVICE)
    ids = torch.tensor([3, 0, 71, 3])
    before = lin.lookup(ids).cpu()
    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is G.gptq_matmul and lin._gptq is not None and lin.qtype == qtype
    torch.testing.assert_close(lin.lookup(ids).cpu(), before, rtol=0, atol=0)
    torch.testing.assert_close(lin.dequantized(torch.float64).cpu(), torch.from_numpy(ref), rtol=0, atol=0)
    # bytes as held: codes, packed zeros (the prefill dequantizer's) and fp16 scales a group of 32, and the
    # GEMV's fp16 zeros as one row (the layer's zero is 8 / 128 in every group)
    bits, groups = (4 if qtype == "Q4_0" else 8), k // 32
    assert lin.gptq_zeros.shape == (1, n) and bool((lin.gptq_zeros == (8 if bits == 4 else 128)).all())
    held = sum(t.numel() * t.element_size() for t in (lin.qweight, lin.qzeros, lin.scales, lin.gptq_zeros))
    assert held == n * k * bits // 8 + groups * n * bits // 8 + groups * n * 2 + n * 2
    gen = torch.Generator().manual_seed(3)
    for m in (1, 3, G.MAX_M + 1):
        x = torch.randn(m, k, generator=gen)
        y = lin(x.to(DEVICE)).double().cpu()
        want = x.double() @ torch.from_numpy(ref).T
        assert float((y - want).abs().max() / want.abs().max()) < 1e-5, m
    x = torch.randn(16, k, generator=gen).half()  # the tl.dot kernel, as on sm_80+
    want = x.double() @ torch.from_numpy(ref).T
    y = G.gptq_matmul(x.to(DEVICE), lin, capability=(9, 0)).double().cpu()
    assert float((y - want).abs().max() / want.abs().max()) < 3e-3


def test_a_q6_k_group_with_scale_0_keeps_the_one_zero_row():
    """A Q6_K sub-block whose int8 scale is 0 is a group of zeros: its zero does not matter, so the layer
    still holds one zero row (32), and its weights there come out 0."""
    n, k = 16, 256
    data, _ = kquant_bytes("Q6_K", n, k, seed=11)
    data = data.copy()
    data.reshape(n, 1, 210)[3, 0, 192 + 5] = 0  # row 3, sub-block 5 (weights 80-95): scale 0
    ref = quants.dequantize(data, GGMLQuantizationType.Q6_K).astype(np.float64)
    assert (ref[3, 80:96] == 0).all() and (ref[3, :80] != 0).any()
    w = gguf_to_gptq("Q6_K", torch.from_numpy(data), k)
    assert w.float_zeros.shape == (1, n) and bool((w.float_zeros == 32).all())
    got = dequantize_gptq(w, dtype=torch.float64)
    assert bool((got[3, 80:96] == 0).all())
    assert bool(((got - torch.from_numpy(ref)).abs() <= group_bound(ref, 16)).all())


@pytest.mark.parametrize("qtype,n", [("Q4_0", 70), ("Q8_0", 33)])
def test_layers_without_a_gptq_form_keep_their_block_kernel(qtype, n):
    """Q4_0 / Q8_0 with N * bits not whole int32 words (their packed integer zeros would not fit)."""
    data, ref = layer_bytes(qtype, n, 64, seed=4)
    assert not repack.can_hold(qtype, n, 64)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, 64))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert lin._gptq is None and lin.kernel is not None and lin.kernel is not G.gptq_matmul
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    want = x.double() @ torch.from_numpy(ref).T
    assert float((lin(x.to(DEVICE)).double().cpu() - want).abs().max() / want.abs().max()) < 1e-5


def kquant_bytes(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random well-formed blocks (random codes and sub-scales, sane fp16 scales) and gguf-py's float64
    dequantization of them. gguf-py quantizes only the 32-weight types, so the K-quants get random bytes,
    with a few sub-blocks' 6-bit scales cleared (sc = 0: the group is a constant, whatever its codes)."""
    from lowgear.bench.synthetic.common import random_blocks

    rng = np.random.default_rng(seed)
    data = random_blocks(rng, qtype, n, k, std=0.02)
    if qtype in ("Q4_K", "Q5_K"):
        blocks = data.reshape(n, k // 256, -1)
        blocks[0, 0, 4] &= 0xC0  # sub-block 0 of row 0's first block: scale 0, min kept
        blocks[1, 0, 4] &= 0xC0
        blocks[1, 0, 8] &= 0xC0  # row 1: scale 0 and min 0 (a zero group)
    ref = quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)
    return data, ref


def gguf_bytes(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A layer of any type with a GPTQ form: gguf-py's quantizer for the 32-weight types, random blocks for
    the K-quants (`kquant_bytes`)."""
    if qtype in ("Q4_0", "Q8_0", "Q4_1", "Q5_0", "Q5_1"):
        return layer_bytes(qtype, n, k, seed)
    return kquant_bytes(qtype, n, k, seed)


def group_bound(ref: np.ndarray, group: int) -> torch.Tensor:
    """What the fp16 scale and zero may cost a weight: 2**-10 of the largest |w| of its group, plus the
    group's mean |w| (the minimum's share, which the zero carries), relative to fp16's 2**-11 step."""
    g = torch.from_numpy(ref).reshape(ref.shape[0], -1, group).abs()
    amp = g.amax(dim=-1, keepdim=True) + g.mean(dim=-1, keepdim=True)
    return (2.0**-10 * amp + 1e-12).expand_as(g).reshape(ref.shape)


@pytest.mark.parametrize("qtype", FLOAT_ZERO)
def test_float_zero_types_are_the_same_weights_within_fp16(qtype, monkeypatch):
    monkeypatch.setattr(repack, "BAND", 16)  # 40 columns: two whole bands and a part
    n, k = 40, 512
    data, ref = gguf_bytes(qtype, n, k, seed=6)
    w = gguf_to_gptq(qtype, torch.from_numpy(data), k)
    bits, group = repack.layout(qtype)
    assert (w.bits, w.group_size, w.qzeros, w.g_idx) == (bits, group, None, None)
    one_zero = {"Q5_0": 16.0, "Q6_K": 32.0}  # one zero a layer: held as one row
    assert w.float_zeros.shape == ((1, n) if qtype in one_zero else (k // group, n))
    assert w.float_zeros.dtype == torch.float16
    if qtype in one_zero:
        assert bool((w.float_zeros == one_zero[qtype]).all())
    got = dequantize_gptq(w, dtype=torch.float64)
    err = (got - torch.from_numpy(ref)).abs()
    assert bool((err <= group_bound(ref, group)).all()), float(err.max())
    if qtype in ("Q4_K", "Q5_K"):  # the scale-0 groups are their constant -dmin * m, exactly in fp16
        torch.testing.assert_close(got[0, :32], torch.from_numpy(ref[0, :32]).half().double(), rtol=0, atol=0)
        assert float(np.ptp(ref[0, :32])) == 0.0 and float(ref[0, 0]) != 0.0  # (the fixture made one)
        assert bool((got[1, :32] == 0).all()) and bool((torch.from_numpy(ref[1, :32]) == 0).all())


SIX_BIT = ["Q5_0", "Q5_1", "Q5_K", "Q6_K"]  # 5/6-bit codes: 8-bit codes below sm_80, 6-bit ones from it


@pytest.mark.parametrize("qtype,six_bit", [(t, False) for t in FLOAT_ZERO] + [(t, True) for t in SIX_BIT])
def test_float_zero_layer_runs_on_every_gptq_path(qtype, six_bit, monkeypatch):
    monkeypatch.setattr(repack, "six_bit", lambda device, capability=None: six_bit)
    n, k = 48, 512
    data, ref = gguf_bytes(qtype, n, k, seed=7)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, k))).to(DEVICE)
    ids = torch.tensor([5, 0, 47])
    before = lin.lookup(ids).cpu().double()
    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is G.gptq_matmul and lin._gptq is not None and lin.qtype == qtype and lin.qzeros is None
    assert lin._gptq["bits"] == repack.layout(qtype, six_bit)[0] == (6 if six_bit else repack.FLOAT_ZERO[qtype][0])
    assert lin.qweight.numel() * 4 == n * k * lin._gptq["bits"] // 8  # the codes' bytes: 6 or 8 bits a weight
    refw = torch.from_numpy(ref)
    bound = group_bound(ref, repack.layout(qtype)[1])
    assert bool(((lin.lookup(ids).cpu().double() - before).abs() <= bound[ids] + 2.0**-10 * before.abs()).all())
    assert bool(((lin.dequantized(torch.float64).cpu() - refw).abs() <= bound).all())
    gen = torch.Generator().manual_seed(8)
    for m in (1, 3, G.MAX_M + 1):  # GEMV (fp32 unpack), and the prefill dequantizer
        x = torch.randn(m, k, generator=gen)
        want = x.double() @ refw.T
        assert float((lin(x.to(DEVICE)).double().cpu() - want).abs().max() / want.abs().max()) < 2e-3, m
    x = torch.randn(16, k, generator=gen).half()  # the tl.dot kernel, as on sm_80+
    want = x.double() @ refw.T
    y = G.gptq_matmul(x.to(DEVICE), lin, capability=(9, 0)).double().cpu()
    assert float((y - want).abs().max() / want.abs().max()) < 3e-3


def test_the_zero_is_taken_off_the_tile_not_rounded_into_the_unpack():
    """A zero of 7.5 (Q4_1 with m = -7.5 d): the exponent trick would round 2**23 + 7.5 to an integer
    and shift every weight by half a step; the GEMV takes zero * sum(x) off the tile instead."""
    n, k = 16, 64
    blocks = np.zeros((n, k // 32, 20), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(2.0**-6).tobytes(), np.uint8)  # d and m exact in fp16
    blocks[..., 2:4] = np.frombuffer(np.float16(-7.5 * 2.0**-6).tobytes(), np.uint8)
    blocks[..., 4:] = np.random.default_rng(9).integers(0, 256, (n, k // 32, 16), dtype=np.uint8)
    data = blocks.reshape(n, -1)
    ref = torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q4_1).astype(np.float64))
    lin = QuantLinear(PackedTensor("Q4_1", torch.from_numpy(data), (n, k))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert float(lin.gptq_zeros.float().unique()[0]) == 7.5
    x = torch.ones(1, k)
    want = x.double() @ ref.T
    assert float((lin(x.to(DEVICE)).double().cpu() - want).abs().max()) < 1e-5  # rounding the zero: 0.5


def test_an_overflowing_zero_keeps_the_block_kernel():
    """Q4_1 with d tiny and m large: -m / d is past fp16's range, so the layer stays a Q4_1 block layer."""
    n, k = 8, 64
    blocks = np.zeros((n, k // 32, 20), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(1e-7).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    data = blocks.reshape(n, -1)
    assert gguf_to_gptq("Q4_1", torch.from_numpy(data), k) is None
    lin = QuantLinear(PackedTensor("Q4_1", torch.from_numpy(data), (n, k))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    assert lin._gptq is None and lin.kernel is not None and lin.kernel is not G.gptq_matmul


def test_six_bit_codes_are_the_eight_bit_codes_in_fewer_bytes(monkeypatch):
    """Q6_K / Q5_K as 6-bit codes: the same weights as the 8-bit form, bit for bit, in 6 / 8 of its code
    bytes; and the choice follows the device (6-bit from sm_80, where the tl.dot kernel serves batched rows)."""
    for qtype in ("Q6_K", "Q5_K"):
        n, k = 24, 256
        data, _ = kquant_bytes(qtype, n, k, seed=12)
        w8 = gguf_to_gptq(qtype, torch.from_numpy(data), k)
        w6 = gguf_to_gptq(qtype, torch.from_numpy(data), k, six_bit=True)
        assert (w8.bits, w6.bits) == (8, 6) and w6.qweight.shape == (k * 6 // 32, n)
        torch.testing.assert_close(dequantize_gptq(w6, dtype=torch.float64), dequantize_gptq(w8, dtype=torch.float64),
                                   rtol=0, atol=0)
    # one row-group by hand: 16 codes of 6 bits, little end first, fill three words; code 5 (21 = 0b010101)
    # straddles words 0 and 1: its low 2 bits are bits 30-31 of word 0, its high 4 bits bits 0-3 of word 1
    codes = torch.arange(16, dtype=torch.int32)[:, None] * 4 + 1  # 1, 5, 9, ..., 61
    words = G.pack_codes(codes, 6)[:, 0].tolist()
    stream = sum(int(c) << (6 * i) for i, c in enumerate(codes[:, 0]))
    assert [w & 0xFFFFFFFF for w in words] == [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(3)]
    assert (words[0] >> 30) & 3 == 0b01 and words[1] & 0xF == 0b0101
    monkeypatch.setattr(repack, "SIX_BIT", True)
    cpu = torch.device("cpu")
    assert [repack.six_bit(cpu, cc) for cc in ((7, 0), (7, 5), (8, 0), (9, 0))] == [False, False, True, True]
    assert not repack.six_bit(cpu)  # CPU tensors: the 8-bit form


@pytest.mark.parametrize("qtype", QTYPES + FLOAT_ZERO + ["Q2_K"])
def test_the_plan_counts_a_layer_as_the_gpu_holds_it(qtype):
    """platform.placement plans a GPU's memory with a repacked layer's held bytes, not the file's (a Q6_K layer
    holds 9 bits a weight against 6.56 stored): every tensor the module holds after the repack, counted here."""
    n, k = 64, 512
    data, _ = gguf_bytes(qtype, n, k, seed=13)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, k))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    held = sum(b.numel() * b.element_size() for b in lin.buffers())
    planned = repack.gpu_held_bytes(qtype, (n, k), data.nbytes)
    if qtype == "Q2_K":  # no GPTQ form: held as stored
        assert lin._gptq is None and planned == held == data.nbytes
        return
    bits = {"Q4_0": 4.625, "Q8_0": 8.75, "Q5_0": 8.5, "Q6_K": 9}.get(qtype, repack.layout(qtype)[0] + 1)
    assert planned == n * k * bits / 8 >= data.nbytes  # (Q4_1: 5 bits a weight in the file and held)
    assert abs(planned - held) <= 2 * n, (planned, held)  # the one zero row, [1, N] fp16, is left out


@pytest.mark.parametrize("qtype,six_bit", [("Q4_0", False), ("Q4_K", False), ("Q6_K", False), ("Q6_K", True),
                                           ("Q5_0", True), ("Q4_1", False)])
def test_gguf_layers_on_tiles_that_span_groups(qtype, six_bit, monkeypatch):
    """gptq_gemv.SPAN_GROUPS: GGUF's groups of 16 and 32 hold 1-4 row-groups, fewer than a tile; with it a tile holds
    several groups, each row-group with its own scale and zero (per group: Q4_K; one row: Q4_0, Q6_K, Q5_0)."""
    monkeypatch.setattr(G, "SPAN_GROUPS", True)
    monkeypatch.setattr(repack, "six_bit", lambda device, capability=None: six_bit)
    n, k = 48, 512
    data, ref = gguf_bytes(qtype, n, k, seed=14)
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data), (n, k))).to(DEVICE)
    lin.kernel = kernels.kernel_for(lin)
    bits, group = lin._gptq["bits"], lin._gptq["group_size"]
    gen = torch.Generator().manual_seed(15)
    for m in (1, 3):
        p = G.launch_params(n, k, bits, lin._gptq_kernel["block_r"], m, span=True)
        assert (group // G.pack_shape(bits)[0]) % p["BLOCK_R"] != 0  # the tiles do span groups
        x = torch.randn(m, k, generator=gen)
        want = x.double() @ torch.from_numpy(ref).T
        assert float((lin(x.to(DEVICE)).double().cpu() - want).abs().max() / want.abs().max()) < 2e-3, m
