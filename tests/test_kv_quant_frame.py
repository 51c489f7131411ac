"""The frame a quantized KV cache stores head vectors in (ops/kv_write.py): (x - shift) @ rotation.

The rotation's matrices against hand-written ones; a write in the frame by hand; attention on each
rung with queries rotated in and the output rotated and shifted back, against float64 attention over
the cache restored to the model's frame (no rotation, no shift), with planted faults (no inverse
rotation, no query rotation, a wrong value shift, a shift under a soft-cap) each failing it; the
shifts a cache calibrates against means taken through a float cache of its own; keys never shifted
for a soft-capped model; batched == alone in every scheme.
"""

from __future__ import annotations

import math

import pytest
import torch

import lowgear as lg
from lowgear.attention.eager import EagerBackend, reference_attention
from lowgear.attention.metadata import build_metadata
from lowgear.attention.sdpa import SdpaBackend
from lowgear.attention.triton import TritonBackend
from lowgear.cache.kv import calibration_ids
from lowgear.errors import ConfigError
from lowgear.ops.kv_write import QuantizedKV, dct, hadamard, head_rotation, restore_output, rotate_query, write_kv
from test_generator import prompts
from test_kv_quant import generated, tiny_gguf, with_kv  # noqa: F401  (tiny_gguf: a fixture)

KINDS = ["int8", "fp8_e4m3", "int4"]


def test_hadamard_and_dct_by_hand():
    r = 1 / math.sqrt(2)
    assert torch.allclose(hadamard(2), torch.tensor([[r, r], [r, -r]], dtype=torch.float64))
    assert torch.equal(hadamard(4) * 2, torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]],
                                                      dtype=torch.float64))
    # DCT-II of order 3, basis vectors as columns: 1/sqrt(3); sqrt(2/3) cos(pi (n + 1/2) k / 3) for k = 1, 2
    a, b, c = 1 / math.sqrt(3), math.sqrt(0.5), 1 / math.sqrt(6)
    assert torch.allclose(dct(3), torch.tensor([[a, b, c], [a, 0, -2 * c], [a, -b, c]], dtype=torch.float64))
    with pytest.raises(ValueError, match="power of two"):
        hadamard(6)


@pytest.mark.parametrize("d", [2, 64, 128, 256, 96, 80, 6])
def test_head_rotation_is_orthogonal_and_spreads_a_channel(d):
    r = head_rotation(d)
    assert r.shape == (d, d) and torch.allclose(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    if d & (d - 1) == 0:
        assert torch.equal(r, hadamard(d))
    else:  # 2^a * m: H(2^a) (x) DCT(m)
        p = d & -d
        assert torch.allclose(r, torch.kron(hadamard(p), dct(d // p)))
    # one channel carrying everything lands on every element at Hadamard orders: no element above 1/sqrt(d)
    if d & (d - 1) == 0:
        assert torch.allclose(r[5 % d].abs(), torch.full((d,), d**-0.5, dtype=torch.float64))


def test_a_write_in_the_frame_by_hand():
    cache = QuantizedKV.zeros((1, 2, 1, 4), "int8", torch.float32, "cpu", rotate=True)
    cache.shift = torch.ones(1, 4)
    x = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    write_kv(x, x, cache, QuantizedKV.zeros((1, 2, 1, 4), "int8", torch.float32, "cpu"), torch.tensor([1]))
    # x - 1 = [0, 1, 2, 3]; times H4 (rows above / 2): [3, -1, -2, 0]; int8 scale 3 / 127
    assert cache.scale[0, 1, 0].item() == pytest.approx(3 / 127)
    assert cache.data[0, 1, 0].tolist() == [127, -42, -85, 0]  # round(-127 / 3), round(-254 / 3)
    assert torch.allclose(cache.restore(cache.double())[0, 1, 0], x[0, 0].double(), atol=0.5 * 3 / 127)


def test_int4_takes_the_clipped_scale_with_the_least_error_by_hand():
    cache = QuantizedKV.zeros((1, 1, 2, 4), "int4", torch.float32, "cpu")
    x = torch.tensor([[[7.5, 2.9, 2.9, 2.9], [7.0, -3.0, 1.2, -7.0]]])
    write_kv(x, x, cache, QuantizedKV.zeros((1, 1, 2, 4), "int4", torch.float32, "cpu"), torch.tensor([0]))
    # first vector: at s = 7.5 / 7 the 2.9s read 3 * 1.0714 (squared error 3 * 0.099 = 0.296); at 0.95 of
    # it (s = 1.0179) 7.5 is held by 7 (0.141) and the 2.9s by 3 (3 * 0.024): 0.212, the least (0.9: 0.58)
    assert cache.scale[0, 0, 0].item() == pytest.approx(7.5 * 0.95 / 7)
    assert cache.codes()[0, 0, 0].tolist() == [7, 3, 3, 3]
    # second: s = 1 holds every element but 1.2 exactly (0.04); any smaller scale loses more on the 7s
    assert cache.scale[0, 0, 1].item() == 1.0 and cache.codes()[0, 0, 1].tolist() == [7, -3, 1, -7]
    # the whole code range: -8 is a code. The first vector negated: at 0.9 (s = 0.9643) -7.5 reads -8 * s
    # (0.046) and the 2.9s 3 * s (3 * 0.00005), less than at 0.95 (0.212) or 0.85 (0.13)
    cache.write(torch.tensor([0]), torch.tensor([[[-7.5, 2.9, 2.9, 2.9], [0.0, 0.0, 0.0, 0.0]]]))
    assert cache.codes()[0, 0, 0].tolist() == [-8, 3, 3, 3] and cache.scale[0, 0, 0].item() == pytest.approx(7.5 * 0.9 / 7)
    assert cache.scale[0, 0, 1].item() == 0 and cache.codes()[0, 0, 1].tolist() == [0, 0, 0, 0]  # zero stays zero


def framed_case(kind, rotate=True, shift=True, page_size=16, hd=32):
    """Caches in the frame, holding keys with a few large channels (as real keys have) and values with an
    offset; q for 3 sequences (a prefill chunk and two decode rows)."""
    gen = torch.Generator().manual_seed(2)
    heads, kv_heads = 4, 2
    q_lens, kv_lens, tables = [5, 1, 1], [page_size + 7, 9, 2 * page_size + 1], [[3, 0], [1], [4, 2, 5]]
    k_cache, v_cache = (QuantizedKV.zeros((6, page_size, kv_heads, hd), kind, torch.float32, "cpu", rotate)
                        for _ in range(2))
    big = torch.zeros(kv_heads, hd)
    big[:, 3], big[1, 17] = 12.0, -9.0
    if shift:
        k_cache.shift = big + 0.3 * torch.randn(kv_heads, hd, generator=gen)
        v_cache.shift = torch.randn(kv_heads, hd, generator=gen)
    slots = build_metadata(kv_lens, kv_lens, tables, page_size).slot_mapping
    k = torch.randn(len(slots), kv_heads, hd, generator=gen) + big
    v = torch.randn(len(slots), kv_heads, hd, generator=gen) + 2.0
    write_kv(k, v, k_cache, v_cache, slots)
    meta = build_metadata(q_lens, kv_lens, tables, page_size)
    return torch.randn(sum(q_lens), heads, hd, generator=gen), k_cache, v_cache, meta


def restored(cache):
    """The cache's stored values brought back to the model's frame, as a plain float64 cache."""
    return cache.restore(cache.double())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", [EagerBackend(), SdpaBackend(), TritonBackend()], ids=["eager", "sdpa", "triton"])
def test_attention_in_the_frame_is_attention_over_the_restored_cache(kind, backend):
    q, k_cache, v_cache, meta = framed_case(kind)
    scale = 32**-0.5
    expected = reference_attention(q, restored(k_cache), restored(v_cache), meta, scale)
    got = restore_output(backend.attend(rotate_query(q, k_cache), k_cache, v_cache, meta, scale, None), v_cache)
    assert (got.double() - expected).abs().max() < 1e-4
    decode = build_metadata([1, 1, 1], list(meta.kv_lens_host), [[3, 0], [1], [4, 2, 5]], 16)
    q1 = q[meta.cu_q_lens[1:].long() - 1]
    got = restore_output(backend.attend(rotate_query(q1, k_cache), k_cache, v_cache, decode, scale, None), v_cache)
    assert (got.double() - reference_attention(q1, restored(k_cache), restored(v_cache), decode, scale)).abs().max() < 1e-4


def test_planted_faults_in_the_frame_fail():
    """Each missing or wrong half of the frame moves the output far past the tolerance above."""
    q, k_cache, v_cache, meta = framed_case("int8")
    scale = 32**-0.5
    expected = reference_attention(q, restored(k_cache), restored(v_cache), meta, scale)

    def err(query, out_of):
        return (out_of(EagerBackend().attend(query, k_cache, v_cache, meta, scale, None)).double() - expected).abs().max()

    assert err(rotate_query(q, k_cache), lambda o: restore_output(o, v_cache)) < 1e-4
    assert err(rotate_query(q, k_cache), lambda o: o) > 0.5  # no inverse rotation (nor value shift)
    assert err(q, lambda o: restore_output(o, v_cache)) > 0.1  # queries not rotated
    right = v_cache.shift
    v_cache.shift = right + 0.25  # a wrong value shift
    assert err(rotate_query(q, k_cache), lambda o: restore_output(o, v_cache)) > 0.2
    v_cache.shift = right
    # under a soft-cap a key shift changes the scores' order of magnitude, not just a constant: why the
    # cache never shifts keys for such a model
    capped = reference_attention(q, restored(k_cache), restored(v_cache), meta, scale, softcap=2.0)
    shifted_keys = reference_attention(rotate_query(q, k_cache), k_cache.double(), v_cache.double(), meta, scale,
                                       softcap=2.0)
    assert (restore_output(shifted_keys, v_cache).double() - capped).abs().max() > 0.05


def float_cache_means(path, ids):
    """Mean key and value per layer over one forward of `ids` through a float Cache (the model's own kind)."""
    config = lg.Config(path)
    config.devices, config.attn_backend = ["cpu"], "eager"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=len(ids), page_size=len(ids))
    model.load_autosplit(cache)
    model.forward(torch.tensor(ids), build_metadata([len(ids)], [len(ids)], [[0]], len(ids)), cache)
    return [(cache.k[i][0].mean(0), cache.v[i][0].mean(0)) for i in range(len(cache.k))]


def test_calibrated_shifts_are_the_mean_keys_and_values_of_the_calibration_ids(tiny_gguf, monkeypatch):
    monkeypatch.setattr(lg.defaults, "KV_CALIBRATION_TOKENS", 40)
    ids = calibration_ids(lg.Config(tiny_gguf).spec.vocab_size, 40).tolist()
    assert ids == calibration_ids(lg.Config(tiny_gguf).spec.vocab_size, 40).tolist() and len(set(ids)) > 30
    means = float_cache_means(tiny_gguf, ids)
    gens = [with_kv(tiny_gguf, "eager", "int4", max_seq_len=64) for _ in range(2)]
    for gen in gens:
        cache = gen.cache
        assert cache.kv_scheme == {"rot", "k"}  # int4's default: values not shifted
        for i, (mk, mv) in enumerate(means):
            assert torch.allclose(cache.k[i].shift, mk, atol=1e-5) and cache.v[i].shift is None
            assert torch.equal(cache.k[i].shift, gens[0].cache.k[i].shift)  # the same bits on every allocation
            assert torch.equal(cache.k[i].rotation, hadamard(16).float()) and torch.equal(cache.v[i].rotation, cache.k[i].rotation)
    with pytest.raises(ConfigError, match="not a KV frame"):
        lg.Cache(gens[0].model, max_seq_len=64, kv_dtype="int8", kv_scheme="rot+q")


def test_keys_are_never_shifted_under_a_soft_cap(tmp_path):
    pytest.importorskip("transformers")
    from test_model_gemma import MODELS, write_gemma

    write_gemma(tmp_path, **MODELS["gemma2"])
    config = lg.Config(str(tmp_path))
    config.devices, config.attn_backend = ["cpu"], "eager"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=64, page_size=16, kv_dtype="int8", kv_scheme="rot+k+v")
    model.load_autosplit(cache)
    assert model.spec.attn_softcap
    assert all(k.shift is None and v.shift is not None and k.rotation is not None for k, v in zip(cache.k, cache.v))


@pytest.mark.parametrize("kind, scheme", [("int8", "rot+k+v"), ("fp8_e4m3", "k+v"), ("int4", "rot")])
def test_batched_equals_alone_in_each_frame(tiny_gguf, monkeypatch, kind, scheme):
    monkeypatch.setattr(lg.defaults, "KV_SCHEMES", {**lg.defaults.KV_SCHEMES, kind: scheme})
    ids = prompts(4)
    alone = [generated(with_kv(tiny_gguf, "sdpa", kind, max_batch_size=1, paged=False), [p])[0] for p in ids]
    gen = with_kv(tiny_gguf, "sdpa", kind, max_batch_size=4, max_chunk_size=12)
    assert gen.cache.kv_scheme == set(scheme.split("+"))
    both = generated(gen, ids + [ids[-1][:16] + [7, 8]])  # the last shares a full page with another
    assert both[: len(ids)] == alone and gen.pool.num_cached > 0
