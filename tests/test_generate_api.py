"""The ExLlamaV2-shaped Python API on the embedded SmolLM2: streaming, seeds, stop strings, ExLlamaV2's no-flash-attn recipe."""

from __future__ import annotations

import pytest

import lowgear as lg


@pytest.fixture(scope="module")
def stack(smollm2_path):
    config = lg.Config(smollm2_path)
    config.no_flash_attn = True  # ExLlamaV2's no-flash-attn recipe: set before load
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=4096, lazy=True)
    model.load_autosplit(cache, progress=False)
    tokenizer = lg.Tokenizer(config)
    generator = lg.DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=True, max_batch_size=8)
    generator.warmup()
    return tokenizer, generator


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def test_seed_recipe_batch_of_eight(stack):
    tokenizer, gen = stack
    questions = ["What is 2+2?", "Name a color.", "Say hello.", "What is the capital of Italy?",
                 "Name an animal.", "What is water?", "Count to three.", "Name a fruit."]
    prompts = [chat(tokenizer, q) for q in questions]
    together = gen.generate(prompts, max_new_tokens=8, temperature=0.0, encode_special_tokens=True, completion_only=True)
    alone = [gen.generate(p, max_new_tokens=8, temperature=0.0, encode_special_tokens=True, completion_only=True) for p in prompts]
    assert together == alone
    assert all(t.strip() for t in together)
    assert gen.pool.num_used == 0


def test_stream_concatenates_to_generate(stack):
    tokenizer, gen = stack
    p = chat(tokenizer, "Write one sentence about the sea, with an emoji.")
    full = gen.generate(p, max_new_tokens=24, temperature=0.0, encode_special_tokens=True, completion_only=True)
    chunks = list(gen.stream(p, max_new_tokens=24, temperature=0.0, encode_special_tokens=True))
    assert len(chunks) > 1
    assert "".join(chunks) == full


def test_completion_only_false_returns_prompt_plus_completion(stack):
    _, gen = stack
    out = gen.generate("The capital of France is", max_new_tokens=4, temperature=0.0)
    assert out.startswith("The capital of France is") and len(out) > len("The capital of France is")


def test_same_seed_same_text_other_seed_differs(stack):
    tokenizer, gen = stack
    p = chat(tokenizer, "Tell me a very short story.")
    kw = dict(max_new_tokens=10, temperature=1.2, top_k=0, top_p=1.0, encode_special_tokens=True, completion_only=True)
    a = gen.generate(p, seed=1234, **kw)
    b = gen.generate(p, seed=1234, **kw)
    others = {gen.generate(p, seed=s, **kw) for s in (1, 2)}
    assert a == b
    assert len(others | {a}) > 1


def test_stop_string_cuts_exactly_across_tokens(stack):
    tokenizer, gen = stack
    p = chat(tokenizer, "List three colors, comma separated.")
    kw = dict(max_new_tokens=24, temperature=0.0, encode_special_tokens=True, completion_only=True)
    full = gen.generate(p, **kw)
    ids = tokenizer.encode_ids(full)
    assert len(ids) >= 6
    # a stop string that starts inside one token's text and ends inside a later one's
    first = tokenizer.decode(ids[:2])
    stop = full[len(first) - 1 : len(first) + 5]
    assert stop and full.find(stop) >= 0
    cut = gen.generate(p, stop_conditions=[stop] + sorted(tokenizer.stop_token_ids), **kw)
    assert cut == full[: full.find(stop)]
    streamed = "".join(gen.stream(p, stop_conditions=[stop], max_new_tokens=24, temperature=0.0, encode_special_tokens=True))
    assert streamed == cut


def test_simple_generator_paged_false(stack, smollm2_path):
    tokenizer, gen = stack
    simple = lg.Generator(gen.model, gen.cache, tokenizer)
    p = chat(tokenizer, "What is the capital of France?")
    assert simple.max_batch_size == 1 and not simple.paged
    assert simple.generate(p, max_new_tokens=10, temperature=0.0, encode_special_tokens=True, completion_only=True) == \
        gen.generate(p, max_new_tokens=10, temperature=0.0, encode_special_tokens=True, completion_only=True)
