"""formats/gptq.py, QuantLinear over GPTQ tensors, and GPTQ Hugging Face folders in formats/hf.py.

The GPTQ tensors are written here by a small round-to-nearest quantizer with its own packer (a
bit matrix folded into int32 words), and every check is against a float64 reference computed from
the unpacked integers, not from lowgear's unpacking.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import LLAMA_LINEARS, all_logits, hf_logits, load, write_quantized_llama

from lowgear.errors import ModelFormatError, UnsupportedError
from lowgear.model.linear import QuantLinear
from lowgear.formats.gptq import GPTQWeight, dequantize_gptq
from lowgear.formats.hf import HFSource

transformers = pytest.importorskip("transformers")


def pack_bits(vals: np.ndarray, bits: int) -> np.ndarray:
    """ints [n, m] -> int32 [n * bits / 32, m]: each column one little-end-first bit stream."""
    n, m = vals.shape
    stream = (vals[:, None, :] >> np.arange(bits)[None, :, None]) & 1  # [n, bits, m]
    stream = stream.reshape(n * bits // 32, 32, m).astype(np.uint64)
    words = (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1)
    return words.astype(np.uint32).view(np.int32)


def quantize(w: torch.Tensor, bits: int, group_size: int, act_order: bool, v2: bool, sym: bool = False, seed: int = 0):
    """float W [out, in] -> (GPTQ tensors dict, float64 reference W from the integer codes)."""
    out, n_in = w.shape
    rng = np.random.default_rng(seed)
    gs = n_in if group_size == -1 else group_size
    groups = -(-n_in // gs)
    g = np.arange(n_in) // gs
    if act_order:
        g = g[rng.permutation(n_in)]
    maxq = (1 << bits) - 1
    wt = w.double().numpy().T  # [in, out]
    scale = np.empty((groups, out))
    zero = np.empty((groups, out), dtype=np.int64)
    for k in range(groups):
        rows = wt[g == k]
        lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
        if sym:
            scale[k] = np.maximum(np.abs(lo), hi) * 2 / maxq + 1e-8
            zero[k] = (maxq + 1) // 2
        else:
            scale[k] = (hi - lo) / maxq + 1e-8
            zero[k] = np.clip(np.round(-lo / scale[k]), 1, maxq)  # v1 cannot store a zero of 0
    scale16 = torch.tensor(scale, dtype=torch.float16)
    s = scale16.double().numpy()
    q = np.clip(np.round(wt / s[g] + zero[g]), 0, maxq).astype(np.int64)  # [in, out]
    ref = torch.tensor(((q - zero[g]) * s[g]).T)  # [out, in] float64
    stored_zero = zero if v2 else zero - 1
    tensors = {
        "qweight": torch.from_numpy(pack_bits(q, bits)),
        "qzeros": torch.from_numpy(pack_bits(stored_zero.T, bits).T.copy()),
        "scales": scale16,
    }
    if act_order:
        tensors["g_idx"] = torch.tensor(g, dtype=torch.int32)
    return tensors, ref


def gptq(w, bits, group_size, act_order=False, v2=False, sym=False, seed=0):
    t, ref = quantize(w, bits, group_size, act_order, v2, sym, seed)
    return GPTQWeight(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), bits, group_size, sym, 0 if v2 else 1), ref


CASES = [  # bits, out, in, group_size, act_order, v2, sym
    (4, 48, 128, 32, False, False, False),
    (4, 40, 96, 32, True, False, False),  # 3 groups, act-order
    (4, 64, 256, 128, True, True, False),
    (4, 32, 96, -1, False, True, True),
    (8, 24, 96, 32, True, False, False),
    (2, 48, 160, 32, False, True, False),
    (3, 64, 96, 32, True, False, False),  # 3-bit: values straddle int32 words
    (3, 32, 256, 128, False, True, True),
]


@pytest.mark.parametrize("bits,out,n_in,gs,act,v2,sym", CASES)
def test_dequantize_matches_integer_reference(bits, out, n_in, gs, act, v2, sym):
    w0 = torch.randn(out, n_in)
    w, ref = gptq(w0, bits, gs, act, v2, sym)
    assert w.validate() is w and w.shape == (out, n_in)
    assert w.qtype == f"GPTQ{bits}g{gs}"
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), ref, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_gptq(w, slice(5, 21), torch.float64), ref[5:21], rtol=0, atol=0)
    idx = torch.tensor([out - 1, 0, 7, 7])
    torch.testing.assert_close(dequantize_gptq(w, idx, torch.float64), ref[idx], rtol=0, atol=0)
    assert dequantize_gptq(w).dtype == torch.float32
    # the reference is within a step of the weights it was quantized from (it is not wrong the same way)
    step = w.scales.double().max()
    assert (ref - w0.double()).abs().max() <= 1.01 * step


@pytest.mark.parametrize("bits,out,n_in,gs,act,v2,sym", CASES)
@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_quant_linear_forward_matches_float64(bits, out, n_in, gs, act, v2, sym, chunk_rows):
    g = torch.Generator().manual_seed(bits * 1000 + out + n_in)  # the inputs are fixed, not the global RNG's
    w, ref = gptq(torch.randn(out, n_in, generator=g), bits, gs, act, v2, sym, seed=1)
    bias = torch.randn(out, generator=g)
    lin = QuantLinear(w, bias, chunk_elements=chunk_rows * n_in)
    x = torch.randn(3, 2, n_in, generator=g)
    y = lin(x)
    expect = x.double() @ ref.T + bias.double()
    assert y.shape == (3, 2, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin(x.double()), expect, rtol=1e-12, atol=1e-12)
    assert lin.packed and lin.qtype == w.qtype and lin.nbytes == w.nbytes and lin.weight is None
    torch.testing.assert_close(lin.dequantized(torch.float64), ref, rtol=0, atol=0)


def test_quant_linear_keeps_gptq_tensors_through_dtype_moves():
    w, ref = gptq(torch.randn(32, 64), 4, 32, act_order=True)
    lin = QuantLinear(w).to(torch.bfloat16)  # fp16 scales must not be rounded to bf16
    assert lin.qweight.dtype == torch.int32 and lin.g_idx.dtype == torch.int32
    torch.testing.assert_close(lin.dequantized(torch.float64), ref, rtol=0, atol=0)
    assert not any(b.is_floating_point() for b in lin.buffers())  # no float copy of the weight
    rows = lin.lookup(torch.tensor([[3, 1]]), torch.float64)
    torch.testing.assert_close(rows, ref[[3, 1]].unsqueeze(0), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- folders

def write_gptq_llama(tmp_path, bits=4, group_size=32, act_order=False, v2=False, quant_extra=None, drop=None):
    """A tiny llama as a GPTQ folder, and transformers' model on the dequantized float weights."""

    def store(name, p, n):
        prefix = name[: -len(".weight")]
        if not any(prefix.endswith(lin) for lin in LLAMA_LINEARS):
            return {name: p.data.clone()}
        parts, ref = quantize(p.data, bits, group_size, act_order, v2, seed=n)
        p.copy_(ref.float())
        return {f"{prefix}.{k}": v for k, v in parts.items()}

    quant = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
             "checkpoint_format": "gptq_v2" if v2 else "gptq", **(quant_extra or {})}
    return write_quantized_llama(tmp_path, "gptq", store, quant, drop=drop)


@pytest.mark.parametrize("group_size,act_order,v2", [(32, False, False), (-1, False, True), (32, True, False)])
def test_tiny_gptq_llama_matches_transformers_on_dequantized_weights(tmp_path, group_size, act_order, v2):
    hf, folder = write_gptq_llama(tmp_path, 4, group_size, act_order, v2)
    source = HFSource(folder)
    info = source.info("layers.0.down")
    assert info.qtype == f"GPTQ4g{group_size}" and info.shape == (64, 96)
    w = source.get("layers.0.down")
    assert isinstance(w, GPTQWeight) and info.nbytes == w.nbytes
    model, cache = load(folder, cpu_weights="packed")  # the packed GPTQ torch path (unpacked: test_cpu_weights.py)
    assert model.layers[0].mlp.down.qtype == info.qtype
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant,words", [
    ({"quant_method": "hqq"}, ["'hqq'", "GPTQ", "AWQ", "EXL2"]),
    ({"quant_method": "bitsandbytes"}, ["'bitsandbytes'", "GPTQ"]),
    ({"bits": 5}, ["5 bits", "2, 3, 4, 8"]),
    ({"checkpoint_format": "marlin"}, ["'marlin'", "gptq_v2"]),
])
def test_unsupported_quantization_is_refused(tmp_path, quant, words):
    _, folder = write_gptq_llama(tmp_path, quant_extra=quant)
    with pytest.raises(UnsupportedError) as e:
        HFSource(folder)
    for word in words:
        assert word in str(e.value)


def test_missing_or_misshaped_gptq_tensors_name_the_tensor(tmp_path):
    _, folder = write_gptq_llama(tmp_path / "a", drop=lambda t: t.pop("model.layers.1.mlp.up_proj.qzeros"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.qzeros is missing"):
        HFSource(folder).get("layers.1.up")  # found as the folder opens (its shape is checked there)

    def bad_scales(t):
        t["model.layers.0.self_attn.o_proj.scales"] = t["model.layers.0.self_attn.o_proj.scales"][:1].clone()

    _, folder = write_gptq_llama(tmp_path / "b", drop=bad_scales)
    with pytest.raises(ModelFormatError, match=r"o_proj\.scales must be torch\.float16 \[2, 64\]"):
        HFSource(folder).get("layers.0.o")

    def bad_qweight(t):
        t["model.layers.0.mlp.gate_proj.qweight"] = t["model.layers.0.mlp.gate_proj.qweight"].float()

    _, folder = write_gptq_llama(tmp_path / "c", drop=bad_qweight)
    with pytest.raises(ModelFormatError, match=r"gate_proj\.qweight must be int32"):
        HFSource(folder).get("layers.0.gate")


@pytest.mark.parametrize("bits,start,stop", [(4, 8, 40), (3, 32, 64), (3, 0, 96), (2, 16, 80)])
def test_a_band_of_columns_is_that_band_of_w(bits, start, stop):
    """What a fused q|k|v tensor's split hands out (formats/fused.py): 3-bit zero points are repacked."""
    from lowgear.formats.fused import rows_of

    w, ref = gptq(torch.randn(96, 64), bits, 32, act_order=True, seed=bits)
    part = rows_of(w, start, stop).validate("part")
    torch.testing.assert_close(dequantize_gptq(part, dtype=torch.float64), ref[start:stop], rtol=0, atol=0)
