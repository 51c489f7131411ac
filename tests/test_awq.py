"""AWQ ("gemm") folders: repacked at load into GPTQ tensors, against a float64 dequantization written here.

The reference packs codes the way AutoAWQ documents its GEMM layout (qweight int32 [K, N / 8], nibble i
of word j holding column 8j + ORDER[i], ORDER = 0 2 4 6 1 3 5 7; qzeros the same over groups; fp16
scales [K / g, N]; w = (q - z) * s), independently of lowgear's unpacker; a hand-computed word pins
that packer to the order. The repacked layer must give those values through dequantize_gptq, the
torch linear path and the Triton GEMV (interpreted on the CPU), and a tiny llama stored as an AWQ
folder must give the logits of transformers run on the dequantized float weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import LLAMA_LINEARS, all_logits, hf_logits, interpreter_index_shim, load, write_quantized_llama
from lowgear.errors import UnsupportedError
from lowgear.formats.awq import awq_to_gptq
from lowgear.formats.fused import rows_of
from lowgear.formats.gptq import dequantize_gptq
from lowgear.formats.hf import HFSource
from lowgear.model.linear import QuantLinear

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def awq_pack(values: np.ndarray) -> torch.Tensor:
    """int codes [R, N] (0..15) -> int32 [R, N / 8]: bits 4i..4i+3 of word j hold column 8j + ORDER[i]."""
    rows, n = values.shape
    words = np.zeros((rows, n // 8), dtype=np.uint32)
    for j in range(n // 8):
        for i in range(8):
            words[:, j] |= values[:, 8 * j + ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return torch.from_numpy(words.view(np.int32))


def reference(q: np.ndarray, z: np.ndarray, s: np.ndarray, group: int) -> torch.Tensor:
    """float64 W [N, K] = (q[k, n] - z[k // g, n]) * s[k // g, n]."""
    g = np.arange(q.shape[0]) // group
    return torch.from_numpy(((q - z[g]) * s[g].astype(np.float64)).T.copy())


def random_awq(k: int, n: int, group: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // group, n))
    s = (rng.uniform(0.002, 0.05, (k // group, n))).astype(np.float16)
    return q, z, s


def test_hand_packed_example():
    k, n, group = 16, 8, 8
    q = (3 * np.arange(k)[:, None] + 5 * np.arange(n)[None, :]) % 16
    z = (7 * np.arange(2)[:, None] + np.arange(n)[None, :]) % 16
    s = (0.25 * (np.arange(n)[None, :] + 1) * (np.arange(2)[:, None] + 1)).astype(np.float16)
    qweight = awq_pack(q)
    # row 0 holds 0 5 10 15 4 9 14 3 (columns 0..7); in the order 0 2 4 6 1 3 5 7 that is 0 A 4 E 5 F 9 3 from
    # the low nibble up
    assert int(qweight[0, 0]) == 0x39F5E4A0
    w = awq_to_gptq(qweight, awq_pack(z), torch.from_numpy(s), group)
    assert (w.bits, w.group_size, w.zero_offset, w.qtype) == (4, 8, 0, "AWQ4g8")
    want = reference(q, z, s, group)
    assert float(want[3, 9]) == ((27 + 15) % 16 - (7 + 3)) * 0.25 * 4 * 2  # k = 9: group 1; n = 3
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), want, rtol=0, atol=0)


@pytest.mark.parametrize("group", [128, 64, 32])
def test_random_layer_torch_and_triton(group):
    k, n = 256, 96
    q, z, s = random_awq(k, n, group, seed=group)
    want = reference(q, z, s, group)
    w = awq_to_gptq(awq_pack(q), awq_pack(z), torch.from_numpy(s), group)
    torch.testing.assert_close(dequantize_gptq(w, dtype=torch.float64), want, rtol=0, atol=0)
    # a band of output columns (what a fused q|k|v split hands out) is that band of W
    torch.testing.assert_close(dequantize_gptq(rows_of(w, 16, 48), dtype=torch.float64), want[16:48], rtol=0, atol=0)
    gen = torch.Generator().manual_seed(3)
    lin = QuantLinear(w)
    assert lin.qtype == f"AWQ4g{group}"
    for m in (1, 3, 9):
        x = torch.randn(m, k, generator=gen)
        y = lin(x).double()
        ref = x.double() @ want.T
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5, m

    pytest.importorskip("triton")
    from lowgear.ops import matmul as kernels
    from lowgear.ops.matmul import gptq_gemv as G

    lin.kernel = kernels.kernel_for(lin)
    assert lin.kernel is G.gptq_matmul
    with interpreter_index_shim():
        for m in (1, 3, G.MAX_M + 1):
            x = torch.randn(m, k, generator=gen)
            y = lin(x).double()
            ref = x.double() @ want.T
            assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5, m


# ---------------------------------------------------------------------------------------- folders

QUANT = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}


def awq_quantize(p: torch.Tensor, prefix: str, group: int) -> dict:
    """Linear weight p [N, K] as AWQ tensors (asymmetric 4-bit per group of K); p becomes what they decode to."""
    w = p.data.double().t().numpy()  # [K, N], as AWQ stores it
    groups = w.reshape(w.shape[0] // group, group, -1)
    lo, hi = groups.min(axis=1), groups.max(axis=1)
    s = ((hi - lo) / 15).astype(np.float16)
    z = np.clip(np.round(-lo / s.astype(np.float64)), 0, 15).astype(np.int64)
    g = np.arange(w.shape[0]) // group
    q = np.clip(np.round(w / s[g].astype(np.float64)) + z[g], 0, 15).astype(np.int64)
    p.copy_(reference(q, z, s, group).float())
    return {f"{prefix}.qweight": awq_pack(q), f"{prefix}.qzeros": awq_pack(z),
            f"{prefix}.scales": torch.from_numpy(np.ascontiguousarray(s))}


def write_awq_llama(tmp_path, quant=None):
    """A tiny llama as an AWQ folder, and transformers' model on the float64-dequantized weights."""

    def store(name, p, count):
        prefix = name[: -len(".weight")]
        if not any(prefix.endswith(lin) for lin in LLAMA_LINEARS):
            return {name: p.data.clone()}
        return awq_quantize(p, prefix, 32)

    return write_quantized_llama(tmp_path, "awq", store, quant or QUANT)


def test_tiny_awq_llama_matches_transformers_on_dequantized_weights(tmp_path):
    hf, folder = write_awq_llama(tmp_path)
    source = HFSource(folder)
    info = source.info("layers.0.down")
    assert info.qtype == "AWQ4g32" and info.shape == (64, 96)
    assert source.quantization() == {"method": "AWQ", "bits": 4, "group_size": 32, "version": "gemm",
                                     "quantized_linears": 14}
    model, cache = load(folder, cpu_weights="packed")  # the packed (GPTQ) torch path
    assert model.layers[0].mlp.down.qtype == "AWQ4g32" and model.layers[0].mlp.down._gptq["zero_offset"] == 0
    assert model.layers[0].attn.qkv is not None  # q|k|v fused as GPTQ tensors
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_phi3_awq_folder_splits_its_fused_linears(tmp_path):
    """Phi-3 AWQ folders store qkv_proj and gate_up_proj packed: q, k, v, gate and up are column bands
    of the repacked tensors, fused back as GPTQ tensors."""
    from safetensors.torch import save_file
    from test_model_phi3 import ORIGINAL, write_phi3

    hf = write_phi3(tmp_path / "float", "longrope-partial75-tied")
    folder = tmp_path / "awq"
    folder.mkdir()
    tensors = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            prefix = name[: -len(".weight")]
            if prefix.rsplit(".", 1)[-1] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                tensors.update(awq_quantize(p, prefix, 16))  # 16: ffn_down's 112 inputs are whole groups
            else:
                tensors[name] = p.data.clone()
    config = json.loads((tmp_path / "float" / "config.json").read_text())
    config["quantization_config"] = {**QUANT, "group_size": 16}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    source = HFSource(folder)
    assert source.info("layers.1.v").shape == (32, 64) and source.info("layers.1.up").qtype == "AWQ4g16"
    model, cache = load(folder, max_seq_len=ORIGINAL, cpu_weights="packed")
    assert model.layers[0].attn.qkv.qtype == "AWQ4g16" and model.layers[0].mlp.gate_up.out_features == 224
    ids = torch.randint(3, 300, (29,), generator=torch.Generator().manual_seed(2)).tolist()
    torch.testing.assert_close(all_logits(model, cache, ids), hf_logits(hf, ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("change,words", [
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"version": "marlin"}, "AWQ version 'marlin' is not supported"),
    ({"bits": 3}, "AWQ with 3 bits is not supported"),
    ({"zero_point": False}, "AWQ without zero points"),
])
def test_unsupported_awq_variants_are_refused_in_one_line(tmp_path, change, words):
    folder = tmp_path / "awq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {**QUANT, **change}}))
    with pytest.raises(UnsupportedError) as e:
        HFSource(folder)
    assert words in str(e.value) and "4-bit AWQ" in str(e.value) and "\n" not in str(e.value)
