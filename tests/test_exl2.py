"""formats/exl2.py, QuantLinear over EXL2 tensors, and EXL2 Hugging Face folders in formats/hf.py.

The EXL2 tensors are written here by a packer of its own, built from the format's description (act-order
permutation, groups of descending bit width, per-column little-end bit streams, 4-bit scale codes
with scale = fp16((s+1)^2 * fp16(max/256)), codes centred on 2^(bits-1)); every check is against a
float64 reference computed in numpy from the integer codes, not from lowgear's unpacking.

When tests/fixtures/exllamav2/ exists (EXL2 folders written by ExLlamaV2's own converter, with the
weights ExLlamaV2 dequantized), the reader is also checked against those.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import all_logits, hf_logits, load, write_quantized_llama

from lowgear.errors import ModelFormatError, UnsupportedError
from lowgear.model.linear import QuantLinear
from lowgear.formats.exl2 import EXL2Weight, dequantize_exl2
from lowgear.formats.hf import HFSource

transformers = pytest.importorskip("transformers")


# ------------------------------------------------------------------------------------------ packer

def pack_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """ints [rows, cols] -> int32 [rows * bits / 32, cols]: each column one little-end-first bit stream."""
    rows, cols = codes.shape
    assert rows * bits % 32 == 0
    stream = (codes[:, None, :] >> np.arange(bits)[None, :, None]) & 1  # [rows, bits, cols]
    stream = stream.reshape(rows * bits // 32, 32, cols).astype(np.uint64)
    return (stream << np.arange(32, dtype=np.uint64)[None, :, None]).sum(axis=1).astype(np.uint32).view(np.int32)


def scale_f16(scale_codes: np.ndarray, scale_max: np.ndarray) -> np.ndarray:
    """fp16((s + 1)^2 * fp16(max / 256)) as float64 [groups, cols]."""
    smax = (scale_max.astype(np.float64) / 256).astype(np.float16).astype(np.float64)
    return (((scale_codes + 1) ** 2) * smax[:, None]).astype(np.float16).astype(np.float64)


def pack_exl2(q: np.ndarray, groups: list[tuple[int, int]], perm: np.ndarray, scale_codes: np.ndarray,
              scale_max: np.ndarray, store: str = "invperm", out_features: int | None = None):
    """Pack codes into EXL2 tensors; returns (tensors, float64 reference W [out, in]).

    q: unsigned codes [in, width] in packed (act-) order, packed row k = input row perm[k];
    groups: (bits, rows) in packed order; scale_codes: 0..15 [groups, width]; scale_max: fp16 [groups].
    """
    n_in, width = q.shape
    assert sum(r for _, r in groups) == n_in and scale_codes.shape == (len(groups), width)
    words, q_groups, row, qrow = [], [], 0, 0
    zero = np.empty(n_in, dtype=np.int64)
    group_of = np.empty(n_in, dtype=np.int64)
    for g, (bits, rows) in enumerate(groups):
        words.append(pack_stream(q[row:row + rows], bits))
        q_groups += [bits, qrow]
        zero[row:row + rows] = 1 << (bits - 1)
        group_of[row:row + rows] = g
        qrow += rows * bits // 32
        row += rows
    nib = scale_codes.reshape(len(groups), width // 8, 8).astype(np.uint64) << (4 * np.arange(8, dtype=np.uint64))
    q_scale = nib.sum(axis=2).astype(np.uint32).view(np.int32)
    scales = scale_f16(scale_codes, scale_max.astype(np.float16))  # [groups, width]
    packed_w = (q - zero[:, None]) * scales[group_of]  # [in (packed order), width]
    ref = np.empty_like(packed_w)
    ref[perm] = packed_w  # input row perm[k] <- packed row k
    tensors = {
        "q_weight": torch.from_numpy(np.concatenate(words, axis=0)),
        "q_scale": torch.from_numpy(q_scale),
        "q_scale_max": torch.tensor(scale_max, dtype=torch.float16),
        "q_groups": torch.tensor(q_groups, dtype=torch.int16),
    }
    if store in ("invperm", "both"):
        tensors["q_invperm"] = torch.tensor(np.argsort(perm), dtype=torch.int32)
    if store in ("perm", "both"):
        tensors["q_perm"] = torch.tensor(perm, dtype=torch.int16)
    out = width if out_features is None else out_features
    return tensors, torch.tensor(ref.T[:out].copy())


def random_exl2(out, groups, seed=0, store="invperm", act_order=True, pad_to=None):
    """Random codes and scales in the given group layout -> (EXL2Weight, float64 reference)."""
    rng = np.random.default_rng(seed)
    n_in = sum(r for _, r in groups)
    width = pad_to or out
    q = np.concatenate([rng.integers(0, 1 << b, size=(r, width)) for b, r in groups])
    perm = rng.permutation(n_in) if act_order else np.arange(n_in)
    scale_codes = rng.integers(0, 16, size=(len(groups), width))
    scale_max = (rng.uniform(0.5, 2.0, size=len(groups)) * 10.0 ** rng.integers(-4, 0, size=len(groups)))
    t, ref = pack_exl2(q, groups, perm, scale_codes, scale_max.astype(np.float16), store, out)
    return EXL2Weight(**t, out_features=out), ref


def quantize_exl2(w: torch.Tensor, groups: list[tuple[int, int]], seed: int = 0):
    """Round-to-nearest EXL2 of float W [out, in] (random act-order) -> (tensors, float64 reference)."""
    rng = np.random.default_rng(seed)
    n_in = w.shape[1]
    perm = rng.permutation(n_in)
    wt = w.double().numpy().T[perm]  # [in (packed order), out]
    q = np.empty(wt.shape, dtype=np.int64)
    codes, maxes, row = [], [], 0
    for bits, rows in groups:
        block = wt[row:row + rows]
        base = np.abs(block).max(0) / ((2**bits - 1) / 2) + 1e-12  # the scale each column wants
        smax = np.float16(base.max())
        s = np.clip(np.round(np.sqrt(base / np.float64(smax)) * 16), 1, 16).astype(np.int64) - 1
        scale = scale_f16(s[None], np.array([smax]))[0]
        q[row:row + rows] = np.clip(np.round(block / scale) + 2 ** (bits - 1), 0, 2**bits - 1)
        codes.append(s)
        maxes.append(smax)
        row += rows
    return pack_exl2(q, groups, perm, np.stack(codes), np.array(maxes, dtype=np.float16))


# ------------------------------------------------------------------------------------------ dequantize

CASES = {  # name: (out, groups as (bits, rows))
    "2bit": (32, [(2, 32), (2, 16)]),
    "3bit": (24, [(3, 32), (3, 32)]),
    "4bit": (40, [(4, 64), (4, 32), (4, 8)]),
    "5bit": (16, [(5, 32)]),
    "6bit": (32, [(6, 16), (6, 48)]),
    "8bit": (48, [(8, 32), (8, 4)]),
    "mixed": (64, [(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 16)]),
    "mixed_odd_groups": (24, [(4, 32), (3, 32), (3, 32), (2, 32), (2, 16)]),  # 5 groups
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("store", ["invperm", "perm"])
def test_dequantize_matches_integer_reference(case, store):
    out, groups = CASES[case]
    w, ref = random_exl2(out, groups, seed=len(case), store=store)
    n_in = sum(r for _, r in groups)
    assert w.validate() is w and w.shape == (out, n_in)
    torch.testing.assert_close(dequantize_exl2(w, dtype=torch.float64), ref, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_exl2(w, slice(3, 17), torch.float64), ref[3:17], rtol=0, atol=0)
    idx = torch.tensor([out - 1, 0, 7, 7, 9])
    torch.testing.assert_close(dequantize_exl2(w, idx, torch.float64), ref[idx], rtol=0, atol=0)
    # every value is an integer times an fp16, so float32 holds it exactly too
    torch.testing.assert_close(dequantize_exl2(w).double(), ref, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_exl2(w, dtype=torch.float16), ref.half(), rtol=0, atol=0)


def test_without_act_order_and_with_padded_columns():
    w, ref = random_exl2(20, [(4, 32), (3, 32)], act_order=False, pad_to=32)
    assert w.shape == (20, 64) and w.width == 32
    torch.testing.assert_close(dequantize_exl2(w, dtype=torch.float64), ref, rtol=0, atol=0)
    identity = EXL2Weight(w.q_weight, w.q_scale, w.q_scale_max, w.q_groups, out_features=20).validate()
    torch.testing.assert_close(dequantize_exl2(identity, dtype=torch.float64), ref, rtol=0, atol=0)


def test_qtype_bits_and_bytes():
    w, _ = random_exl2(32, [(6, 32), (4, 64), (2, 32)])
    n_in, groups = 128, 3
    code_bits = 32 * 6 + 64 * 4 + 32 * 2
    expect = (code_bits * 32 + groups * (32 * 4 + 48) + n_in * 32) / (n_in * 32)
    assert w.bits_per_weight == pytest.approx(expect) and w.qtype == f"EXL2_{expect:.2f}bpw"
    assert w.bits_histogram() == {6: 32, 4: 64, 2: 32}
    assert w.nbytes == code_bits * 32 // 8 + groups * 32 // 2 + groups * 2 + groups * 4 + n_in * 4
    w2, _ = random_exl2(32, [(6, 32), (4, 64), (2, 32)], store="both")
    assert w2.nbytes == w.nbytes  # one permutation is held


# ------------------------------------------------------------------------------------------ QuantLinear

@pytest.mark.parametrize("case", ["mixed", "mixed_odd_groups", "3bit"])
@pytest.mark.parametrize("chunk_rows", [5, 1000])
def test_quant_linear_forward_matches_float64(case, chunk_rows):
    out, groups = CASES[case]
    w, ref = random_exl2(out, groups, seed=3)
    n_in = ref.shape[1]
    bias = torch.randn(out)
    lin = QuantLinear(w, bias, chunk_elements=chunk_rows * n_in)
    x = torch.randn(3, 2, n_in)
    expect = x.double() @ ref.T + bias.double()
    y = lin(x)
    assert y.shape == (3, 2, out) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) * n_in)
    torch.testing.assert_close(lin(x.double()), expect, rtol=1e-12, atol=1e-12)
    assert lin.packed and lin.qtype == w.qtype and lin.nbytes == w.nbytes and lin.weight is None
    assert lin._exl2 is not None and lin._gptq is None
    torch.testing.assert_close(lin.dequantized(torch.float64), ref, rtol=0, atol=0)


def test_quant_linear_keeps_exl2_tensors_through_dtype_moves():
    w, ref = random_exl2(32, [(5, 32), (3, 32)], seed=4, store="perm")
    lin = QuantLinear(w).to(torch.bfloat16)  # the fp16 q_scale_max must not be rounded to bf16
    assert not any(b.is_floating_point() for b in lin.buffers())  # no float copy of the weight
    assert lin.q_invperm.dtype == torch.int16  # derived from q_perm, held in its dtype
    torch.testing.assert_close(lin.dequantized(torch.float64), ref, rtol=0, atol=0)
    rows = lin.lookup(torch.tensor([[3, 1]]), torch.float64)
    torch.testing.assert_close(rows, ref[[3, 1]].unsqueeze(0), rtol=0, atol=0)
    pytest.importorskip("triton")
    from lowgear.ops import matmul as kernels
    from lowgear.ops.matmul.exl2_gemv import exl2_matmul

    assert kernels.kernel_for(lin) is exl2_matmul  # tests/test_quant_kernels_exl2.py checks it


# ------------------------------------------------------------------------------------------ errors

def _parts(**change):
    w, _ = random_exl2(32, [(4, 32), (3, 32)], seed=5)
    t = {"q_weight": w.q_weight, "q_scale": w.q_scale, "q_scale_max": w.q_scale_max, "q_groups": w.q_groups,
         "q_invperm": w.q_invperm}
    t.update(change)
    return EXL2Weight(**t)


def test_validate_names_what_is_wrong():
    w = _parts()
    with pytest.raises(ModelFormatError, match=r"lin\.q_weight must be int32"):
        _parts(q_weight=w.q_weight.float()).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_scale must be torch\.int32 \[2, 4\]"):
        _parts(q_scale=w.q_scale[:1]).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_scale_max must be torch\.float16 \[2\]"):
        _parts(q_scale_max=w.q_scale_max.float()).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_invperm must be .* \[64\]"):
        _parts(q_invperm=w.q_invperm[:63]).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_invperm is not a permutation"):
        _parts(q_invperm=torch.zeros(64, dtype=torch.int32)).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_groups must be int16"):
        _parts(q_groups=w.q_groups[:3]).validate("lin")
    with pytest.raises(ModelFormatError, match=r"lin\.q_groups: group 1 \(3-bit\) spans packed rows"):
        _parts(q_groups=torch.tensor([4, 0, 3, 5], dtype=torch.int16)).validate("lin")
    with pytest.raises(UnsupportedError, match=r"lin\.q_groups: group 1 has 7-bit codes.*2, 3, 4, 5, 6, 8"):
        _parts(q_groups=torch.tensor([4, 0, 7, 4], dtype=torch.int16)).validate("lin")
    with pytest.raises(ModelFormatError, match=r"40 output features do not fit q_weight's 32 columns"):
        EXL2Weight(w.q_weight, w.q_scale, w.q_scale_max, w.q_groups, w.q_invperm, out_features=40).validate("lin")


# ------------------------------------------------------------------------------------------ folders

_LINEARS = {  # hf suffix -> group layout over its inputs (hidden 64, intermediate 96)
    "self_attn.q_proj": [(6, 32), (4, 32)],
    "self_attn.k_proj": [(8, 32), (3, 32)],
    "self_attn.v_proj": [(5, 32), (5, 32)],
    "self_attn.o_proj": [(4, 32), (2, 32)],
    "mlp.gate_proj": [(4, 64)],
    "mlp.up_proj": [(3, 32), (3, 32)],
    "mlp.down_proj": [(5, 32), (4, 32), (2, 32)],
}


def write_exl2_llama(tmp_path, vocab=300, quant_config=True, drop=None):
    """A tiny llama as an EXL2 folder (fp16 embedding/norms, 8-bit lm_head padded to a multiple of 32), and
    transformers' model on the dequantized float weights."""

    def store(name, p, n):
        prefix = name[: -len(".weight")]
        layout = next((g for lin, g in _LINEARS.items() if prefix.endswith(lin)), None)
        if prefix == "lm_head":
            layout = [(8, 64)]
        if layout is None:  # embedding and norms: fp16, as ExLlamaV2's converter writes them
            p.copy_(p.half().float())
            return {name: p.data.half().clone()}
        w = p.data
        pad = -w.shape[0] % 32
        parts, ref = quantize_exl2(torch.cat([w, w.new_zeros(pad, w.shape[1])]), layout, seed=n)
        p.copy_(ref[: w.shape[0]].float())
        return {f"{prefix}.{k}": v for k, v in parts.items()}

    quant = {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 8,
             "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"}} if quant_config else None
    return write_quantized_llama(tmp_path, "exl2", store, quant, vocab=vocab, drop=drop)


@pytest.mark.parametrize("quant_config", [True, False])  # older folders have no quantization_config
def test_tiny_exl2_llama_matches_transformers_on_dequantized_weights(tmp_path, quant_config):
    hf, folder = write_exl2_llama(tmp_path, quant_config=quant_config)
    source = HFSource(folder)
    info = source.info("layers.0.down")
    w = source.get("layers.0.down")
    assert isinstance(w, EXL2Weight) and info.nbytes == w.nbytes and info.qtype == w.qtype
    assert info.shape == w.shape == (64, 96) and info.qtype.startswith("EXL2_")
    head = source.get("lm_head")
    assert head.shape == (300, 64) == source.info("lm_head").shape and head.width == 320
    assert source.info("embed").qtype == "F16"
    q = source.quantization()
    assert q["method"] == "EXL2" and q["quantized_linears"] == 15 and q["float_linears"] == 0
    bpw = {n: source.get(n).bits_per_weight for n in source.names() if n.startswith("layers.") and n[-1] != "m"}
    assert q["min"] == [min(bpw, key=bpw.get), min(bpw.values())] and q["max"][1] == max(bpw.values())
    assert min(bpw.values()) < q["bits_per_weight"] < max(bpw.values())
    assert q["head_bits_per_weight"] == pytest.approx(head.bits_per_weight)

    model, cache = load(folder, cpu_weights="packed")  # the packed EXL2 torch path
    assert model.layers[0].mlp.down.qtype == info.qtype and model.lm_head.out_features == 300
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_missing_or_misshaped_exl2_tensors_name_the_tensor(tmp_path):
    _, folder = write_exl2_llama(tmp_path / "a", drop=lambda t: t.pop("model.layers.1.mlp.up_proj.q_scale"))
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.q_scale is missing"):
        HFSource(folder).get("layers.1.up")  # found as the folder opens (its shape is checked there)

    _, folder = write_exl2_llama(tmp_path / "b", drop=lambda t: t.pop("model.layers.0.self_attn.q_proj.q_invperm"))
    with pytest.raises(ModelFormatError, match=r"q_proj\.q_invperm is missing"):
        HFSource(folder).get("layers.0.q")

    def bad_max(t):
        t["model.layers.0.self_attn.o_proj.q_scale_max"] = t["model.layers.0.self_attn.o_proj.q_scale_max"].float()

    _, folder = write_exl2_llama(tmp_path / "c", drop=bad_max)
    with pytest.raises(ModelFormatError, match=r"o_proj\.q_scale_max must be torch\.float16 \[2\]"):
        HFSource(folder).get("layers.0.o")

    def bad_bits(t):
        t["model.layers.0.mlp.gate_proj.q_groups"] = torch.tensor([7, 0], dtype=torch.int16)

    _, folder = write_exl2_llama(tmp_path / "d", drop=bad_bits)
    with pytest.raises(UnsupportedError, match=r"gate_proj\.q_groups: group 0 has 7-bit codes"):
        HFSource(folder).get("layers.0.gate")

    def wrong_width(t):
        for part in ("q_weight", "q_scale"):
            name = f"model.layers.0.mlp.up_proj.{part}"
            t[name] = t[name][:, : t[name].shape[1] // 2].clone()

    _, folder = write_exl2_llama(tmp_path / "e", drop=wrong_width)
    with pytest.raises(ModelFormatError, match=r"up_proj\.q_weight has 48 output columns, but config\.json implies 96"):
        HFSource(folder).get("layers.0.up")


def test_other_quant_methods_are_still_refused(tmp_path):
    _, folder = write_exl2_llama(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "hqq"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match=r"'hqq' is not supported.*GPTQ.*EXL2"):
        HFSource(folder)


# ------------------------------------------------------------------------------------------ ExLlamaV2's own files

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "exllamav2")
EXL2_FIXTURES = ["exl2-2.6bpw", "exl2-4.5bpw"]


@pytest.mark.parametrize("name", EXL2_FIXTURES)
def test_reader_reproduces_exllamav2_dequantization_bit_for_bit(name):
    """Folders written by ExLlamaV2's converter; dq.* is ExLlamaV2's float16 `get_weight_tensor_dq`.

    q_proj and lm_head are W itself. ExLlamaV2 loads an MLP's down_proj with `unmap=True` (mlp.py):
    it drops down_proj's permutation and permutes gate/up's outputs instead, so its in-memory down_proj
    keeps the inputs in packed (act-) order: dq.down_proj == W[:, perm]. That is a load-time rearrangement,
    not the file's meaning (gate/up are permuted to match, so the MLP computes the same function).
    """
    folder = os.path.join(FIXTURES, name)
    if not os.path.isdir(folder):
        pytest.skip("tests/fixtures/exllamav2 not present")
    from safetensors.torch import load_file

    source, ref = HFSource(folder), load_file(os.path.join(FIXTURES, "outputs", f"{name}.safetensors"))
    for key, canon in {"q_proj": "layers.0.q", "down_proj": "layers.0.down", "lm_head": "lm_head"}.items():
        w = source.get(canon)
        mine = dequantize_exl2(w, dtype=torch.float64)
        if key == "down_proj":
            mine = mine[:, torch.argsort(w.invperm())]
        assert len(w.bits_histogram()) > 1 or key == "lm_head"  # the converter mixed bit widths here
        torch.testing.assert_close(mine.half(), ref[f"dq.{key}"], rtol=0, atol=0, msg=lambda m, k=key: f"{name} {k}: {m}")
        # float64 differs from ExLlamaV2's float16 by its one final rounding only
        assert ((mine - ref[f"dq.{key}"].double()).abs() <= mine.abs() * 2.0**-11 + 2.0**-25).all()
