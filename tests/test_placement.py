"""Placement plans: splits over devices, auto context length, the out-of-memory message, per-device limits."""

import pytest

from lowgear.platform import hardware, placement
from lowgear.errors import OutOfMemoryError
from lowgear.formats.spec import ModelSpec

GiB = 2**30
RESERVE = 512 * 2**20

LLAMA3_8B = ModelSpec(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192, name="Llama-3-8B")
LLAMA32_1B = ModelSpec(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                       num_heads=32, num_kv_heads=8, head_dim=64, max_position_embeddings=131072,
                       tie_word_embeddings=True, name="Llama-3.2-1B")


def fp16_bytes(spec):
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_dim
    layer = (2 * h * h + 2 * h * kv + 3 * h * spec.intermediate_size) * 2 + 2 * h * 2
    embed = spec.vocab_size * h * 2
    other = {"embed": embed, "norm": h * 2, "lm_head": 0 if spec.tie_word_embeddings else embed}
    return [layer] * spec.num_layers, other


@pytest.fixture
def t4s(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4,t4")
    return hardware.list_devices()[:2]


def cache_per_layer(spec):
    return placement.kv_bytes_per_token_per_layer(spec, 2)


def test_kv_bytes():
    assert placement.kv_bytes_per_token(LLAMA3_8B, 2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert cache_per_layer(LLAMA3_8B) * 32 == 131072


def test_8b_fp16_splits_over_two_t4(t4s):
    layers, other = fp16_bytes(LLAMA3_8B)
    assert 14.5 * GiB < sum(layers) + sum(other.values()) < 15.5 * GiB
    plan = placement.plan(LLAMA3_8B, layers, other, t4s, cache_per_layer(LLAMA3_8B), 8192, RESERVE)
    assert plan.layer_device == tuple(sorted(plan.layer_device))  # in order
    assert set(plan.layer_device) == {0, 1}
    assert plan.embed_device == 0 and plan.head_device == 1
    for p in plan.per_device:
        assert p.total <= p.budget
        assert p.cache == 8192 * cache_per_layer(LLAMA3_8B) * len(p.layers)
    assert sum(plan.bytes_per_device.values()) == sum(layers) + sum(other.values()) + 8192 * 131072
    assert plan.kv_tokens_fit >= 8192
    assert "cuda:1 (Tesla T4): layers" in plan.describe()


def test_8b_fp16_auto_over_two_t4(t4s):
    layers, other = fp16_bytes(LLAMA3_8B)
    plan = placement.plan(LLAMA3_8B, layers, other, t4s, cache_per_layer(LLAMA3_8B), "auto", RESERVE)
    assert plan.max_seq_len % 256 == 0
    budget = sum(p.budget for p in plan.per_device)
    used = sum(plan.bytes_per_device.values())
    assert 0 <= budget - used < 256 * 131072 + max(layers)  # nearly full: one more page would not fit
    with pytest.raises(OutOfMemoryError):
        placement.plan(LLAMA3_8B, layers, other, t4s, cache_per_layer(LLAMA3_8B), plan.max_seq_len + 256 * 40, RESERVE)


def test_1b_auto_on_one_t4(t4s):
    layers, other = fp16_bytes(LLAMA32_1B)
    plan = placement.plan(LLAMA32_1B, layers, other, t4s[:1], cache_per_layer(LLAMA32_1B), "auto", RESERVE, page_size=256)
    per_token = placement.kv_bytes_per_token(LLAMA32_1B, 2)  # 32 KiB
    free = t4s[0].total_memory - RESERVE - sum(layers) - sum(other.values())
    assert plan.max_seq_len == free // per_token // 256 * 256
    assert plan.max_seq_len > 300_000
    capped = placement.plan(LLAMA32_1B, layers, other, t4s[:1], cache_per_layer(LLAMA32_1B), "auto", RESERVE,
                            max_tokens_cap=LLAMA32_1B.max_position_embeddings)
    assert capped.max_seq_len == 131072


def test_8b_fp16_does_not_fit_one_t4(t4s):
    layers, other = fp16_bytes(LLAMA3_8B)
    with pytest.raises(OutOfMemoryError) as err:
        placement.plan(LLAMA3_8B, layers, other, t4s[:1], cache_per_layer(LLAMA3_8B), 8192, RESERVE)
    text = str(err.value)
    assert "missing" in text and "quantized" in text and "another" in text and "GiB" in text
    with pytest.raises(OutOfMemoryError, match="no room for even one page"):
        placement.plan(LLAMA3_8B, layers, other, t4s[:1], cache_per_layer(LLAMA3_8B), "auto", RESERVE)


def test_smaller_context_suggested(t4s):
    layers, other = fp16_bytes(LLAMA32_1B)
    with pytest.raises(OutOfMemoryError, match=r"at most \d+ tokens fit"):
        placement.plan(LLAMA32_1B, layers, other, t4s[:1], cache_per_layer(LLAMA32_1B), 2_000_000, RESERVE)


def test_per_device_limits(t4s):
    layers, other = fp16_bytes(LLAMA32_1B)
    limit = 2 * GiB
    plan = placement.plan(LLAMA32_1B, layers, other, t4s, cache_per_layer(LLAMA32_1B), 4096, RESERVE,
                          per_device_limit=[limit, None])
    first = plan.per_device[0]
    assert first.budget == limit - RESERVE and first.total <= first.budget
    assert set(plan.layer_device) == {0, 1}
    # tied embeddings: the last device needs its own copy of the embedding as lm_head
    assert plan.per_device[1].holds_head
    second_layers = sum(layers[i] for i in plan.per_device[1].layers)
    assert plan.per_device[1].weights == second_layers + other["embed"] + other["norm"]
    by_label = placement.plan(LLAMA32_1B, layers, other, t4s, cache_per_layer(LLAMA32_1B), 4096, RESERVE,
                              per_device_limit={"cuda:0": limit})
    assert by_label.layer_device == plan.layer_device


def test_integer_other_bytes_and_cpu():
    layers, other = fp16_bytes(LLAMA32_1B)
    cpu = hardware.DeviceInfo(index=-1, kind="cpu", name="CPU", total_memory=64 * GiB, free_memory=64 * GiB)
    plan = placement.plan(LLAMA32_1B, layers, sum(other.values()), [cpu], cache_per_layer(LLAMA32_1B), 2048, 0)
    assert plan.layer_device == (0,) * 16 and plan.max_seq_len == 2048
