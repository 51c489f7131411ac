"""ops/matmul/cpu_int4.py: 4-bit GGUF layers on a CPU through torch's int4 kernel, against gguf-py's own
dequantization (float64) and a hand-written emulation of the kernel's stated bfloat16 math; how the
CPU's choice is made and counted (platform/placement.cpu_weights, doctor). The embedded model's greedy
tokens against transformers are in test_model_hf.py."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from lowgear.model.linear import QuantLinear
from lowgear.ops.matmul import cpu_int4
from lowgear.platform import placement
from lowgear.formats.spec import PackedTensor

# the op's presence, not cpu_int4.available(): that probe runs the code under test, and a bug must fail here, not skip
pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no int4 CPU kernel")


def _blocks(qtype: str, n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(GGUF bytes [n, row_bytes], gguf-py's float64 dequantization of them)."""
    if qtype == "Q4_K":  # gguf-py has no Q4_K quantizer: random well-formed blocks
        from lowgear.bench.synthetic.common import random_blocks

        data = random_blocks(np.random.default_rng(seed), qtype, n, k, std=0.02)
    else:
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.02
        w[0, :32] += 0.05  # a group far from zero: Q4_1's minimum is not -8 * scale
        data = quants.quantize(w, GGMLQuantizationType[qtype])
    return data, quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float64)


def _layer(qtype: str, data: np.ndarray, n: int, k: int) -> QuantLinear:
    lin = QuantLinear(PackedTensor(qtype, torch.from_numpy(data.reshape(n, -1).copy()), (n, k)))
    assert cpu_int4.hold(lin)
    return lin


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
@pytest.mark.parametrize("m", [1, 5])
def test_matmul_matches_gguf_dequantization(qtype, m):
    n, k = 48, 512
    data, ref = _blocks(qtype, n, k, seed=3)
    lin = _layer(qtype, data, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1))
    y = lin(x)
    want = x.double() @ torch.from_numpy(ref).T
    # x, the group's scale and its zero are rounded to bfloat16 (2**-9 relative each): a dot product's error
    # stays under 3 * 2**-8 of sum |x| |w| (|w| <= |(q - 8) * s| + |zero|); a wrong zero moves it by the zero
    bound = 3 * 2.0**-8 * (x.double().abs() @ torch.from_numpy(np.abs(ref)).T + 1e-6)
    assert y.dtype == x.dtype and y.shape == (m, n)
    assert bool(((y.double() - want).abs() <= bound).all()), ((y.double() - want).abs() / bound).max()


def test_q4_0_is_the_kernels_bfloat16_math_exactly():
    """Q4_0: w = d * (q - 8), so the kernel's zero is 0 and its scale is d in bfloat16: with x rounded to bfloat16 the
    products are exact and only the float32 sums' order is left."""
    n, k = 16, 256
    data, _ = _blocks("Q4_0", n, k, seed=5)
    b = data.reshape(n, k // 32, 18)
    d = torch.from_numpy(b[..., :2].copy().view(np.float16).astype(np.float32)).to(torch.bfloat16).double()  # [n, g, 1]
    qs = torch.from_numpy(b[..., 2:].astype(np.int64))
    q = torch.cat((qs & 15, qs >> 4), dim=-1)  # [n, g, 32]: low nibbles are weights 0-15, high 16-31
    w = ((q - 8) * d).reshape(n, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(2))
    want = x.to(torch.bfloat16).double() @ w.T
    got = _layer("Q4_0", data, n, k)(x).double()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5 * want.abs().max().item())


def test_held_layer_keeps_its_values_through_dtype_moves_and_dequantizes():
    n, k = 32, 256
    data, ref = _blocks("Q4_1", n, k, seed=7)
    lin = _layer("Q4_1", data, n, k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    before = lin(x)
    lin.to(torch.float16)  # a module dtype move must not round the bfloat16 scales held as int16 bits
    assert lin.i4_scales_zeros.dtype == torch.int16 and lin.qtype == "Q4_1" and lin.int4_cpu
    torch.testing.assert_close(lin(x), before, rtol=0, atol=0)
    w = lin.dequantized(torch.float64)
    # the kernel's weights: within bfloat16 rounding of scale and zero (and the output's bfloat16)
    assert bool(((w - torch.from_numpy(ref)).abs() <= 2.0**-7 * (torch.from_numpy(np.abs(ref)) + 0.02)).all())
    assert lin.nbytes == n * k // 2 + (k // 32) * n * 4


def test_types_and_shapes_it_takes():
    assert cpu_int4.can_hold("Q4_0", 16, 64) and cpu_int4.can_hold("Q4_K", 32, 512)
    assert not cpu_int4.can_hold("Q4_K", 16, 288)  # not whole 256-weight blocks
    assert not cpu_int4.can_hold("Q4_0", 24, 64)  # the packer takes rows in multiples of 16
    assert not cpu_int4.can_hold("Q8_0", 8, 64) and not cpu_int4.can_hold("Q6_K", 8, 256)
    lin = QuantLinear(PackedTensor("Q8_0", torch.zeros(4, 34, dtype=torch.uint8), (4, 32)))
    assert not cpu_int4.hold(lin) and not lin.int4_cpu


class _Source:
    """A weight source of stated tensor types and shapes (what placement reads), no data."""

    def __init__(self, tensors: dict[str, tuple[str, tuple[int, int]]]):
        self.tensors = tensors

    def names(self):
        return list(self.tensors)

    def info(self, name):
        qtype, shape = self.tensors[name]
        return types.SimpleNamespace(qtype=qtype, shape=shape)

    def nbytes(self, name):
        from lowgear.formats.blocks import get_format

        qtype, shape = self.tensors[name]
        return shape[0] * 4 if qtype == "F32" else shape[0] * get_format(qtype).row_bytes(shape[1])


SOURCE = _Source({"embed": ("Q4_0", (1000, 64)), "layers.0.q": ("Q4_1", (64, 64)), "layers.0.down": ("Q8_0", (64, 128)),
                  "layers.0.attn_norm": ("F32", (64,))})


def test_choice_counts_what_each_layer_is_held_as():
    c = placement.cpu_weights(SOURCE, "auto", 4, ram=1 << 34, int4_bytes=cpu_int4.int4_bytes)
    assert c.int4 and c.int4_layers == 1 and c.unpack  # the embedding is looked up by row: never int4
    # by hand: q as int4 (64 * 64 / 2 + 2 groups * 64 rows * 4 bytes), embed and down unpacked to float32, the norm,
    # and the tied head's bfloat16 copy (ops/matmul/cpu_head.py)
    assert c.held_bytes == (64 * 64 // 2 + 2 * 64 * 4) + (1000 * 64 + 64 * 128) * 4 + 64 * 4 + 1000 * 64 * 2
    assert "1 4-bit layers stay 4-bit" in c.why and "cpu_weights=unpacked" in c.why and "head also held" in c.why
    half = placement.cpu_weights(SOURCE, "auto", 2, ram=1 << 34, int4_bytes=cpu_int4.int4_bytes)  # a 16-bit model
    assert half.held_bytes == (64 * 64 // 2 + 2 * 64 * 4) + (1000 * 64 + 64 * 128) * 2 + 64 * 4  # no copy
    u = placement.cpu_weights(SOURCE, "unpacked", 4, ram=1 << 34, int4_bytes=cpu_int4.int4_bytes)
    assert not u.int4 and u.held_bytes == (1000 * 64 + 64 * 64 + 64 * 128) * 4 + 64 * 4
    none = placement.cpu_weights(SOURCE, "int4", 4, ram=1 << 34, int4_bytes=None)  # a torch without the kernel
    assert not none.int4 and "no int4 CPU kernel" in none.why


def test_default_choice_on_the_embedded_model_and_doctor_says_it(smollm2_path, monkeypatch, capsys):
    import lowgear as lg
    from lowgear.cli.main import main

    monkeypatch.delenv("LOWGEAR_CPU_WEIGHTS", raising=False)  # conftest pins the float32 reference
    config = lg.Config(smollm2_path)
    config.devices = "cpu"
    model = lg.Model(config)
    model.load_autosplit(lg.Cache(model, max_seq_len=256, page_size=64))
    held = [m for layer in model.layers for m in layer.modules() if isinstance(m, QuantLinear)]
    assert model.cpu_weights.int4 and all(m.int4_cpu for m in held)  # every Q4_1 layer, fused q|k|v and gate|up
    assert not getattr(model.embed, "int4_cpu", False) and model.embed.weight is not None  # the tied Q8_0 table
    assert model.lm_head.head_bf16.dtype == torch.bfloat16 and model.embed.weight.is_contiguous()  # cpu_head.hold
    main(["doctor", "--model", smollm2_path, "--device", "cpu"])
    assert "4-bit layers as int4" in capsys.readouterr().out



def test_cpu_head_recomputes_the_leading_logits_in_float32():
    """ops/matmul/cpu_head.py: two tokens whose logits are 30.000 and 30.010 (hand-made rows) round to one
    bfloat16 value (steps of 0.125 there), so the bfloat16 product alone ties them and argmax takes the first;
    the float32 recompute of the leading logits keeps them apart and picks the second. At one row the float32
    product runs as it is. The other logits stay within bfloat16's rounding of the float64 product."""
    from lowgear.ops.matmul import cpu_head

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g) * 0.05
    x = torch.zeros(3, 64)
    x[:, 0] = 1.0
    w[7, 0], w[9, 0] = 30.0, 30.01  # logits 30.000 (token 7) and 30.010 (token 9) for every row
    w[7, 1:], w[9, 1:] = 0.0, 0.0
    assert float(torch.tensor(30.0).bfloat16()) == float(torch.tensor(30.01).bfloat16())  # one bfloat16 value
    m = QuantLinear(w.t().contiguous().t())  # as unpack_ leaves a float head: [out, in] over [in, out]
    assert cpu_head.hold(m) and m.weight.is_contiguous()
    ref = x.double() @ w.double().t()
    y = m(x)
    assert y.dtype == torch.float32 and y.shape == (3, 300)
    assert torch.equal(y.argmax(-1), torch.full((3,), 9))
    assert abs(float(y[0, 9]) - 30.01) < 1e-5 and abs(float(y[0, 7]) - 30.0) < 1e-5
    assert (y.double() - ref).abs().max() <= 2**-8 * ref.abs().max()  # bfloat16 inputs and output elsewhere
    bf16_only = torch.mm(x.bfloat16(), m.head_bf16).float()  # what the product alone would give
    assert int(bf16_only[0].argmax()) == 7
    one = m(x[:1])  # below MIN_ROWS: the float32 product
    assert torch.allclose(one.double(), ref[:1], atol=1e-5)
    assert not cpu_head.hold(m)  # once
