"""Chat templates: turning a conversation into the prompt text a chat model was trained on.

Models ship their own Jinja template (`tokenizer.chat_template` in a GGUF, `chat_template` in a HF
tokenizer_config.json or a chat_template.jinja file). This module renders one the way Hugging Face
does, so prompts match the model card: a sandboxed environment (templates come with downloaded
files), `trim_blocks`/`lstrip_blocks`, the `raise_exception` helper templates use to reject a
conversation, and `bos_token`/`eos_token` variables. Models without a template get ChatML.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from ..errors import ConfigError

# ChatML, the format of Qwen, SmolLM and many fine-tunes: <|im_start|>role\ncontent<|im_end|>\n
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ConfigError):
    """The chat template is broken, or it rejected the conversation."""


def _raise_exception(message):
    raise ChatTemplateError(f"the model's chat template rejected the conversation: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # HF's templates expect non-ASCII text to stay as written
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str):
    """Compile a template once; raises ChatTemplateError when it is not valid Jinja."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja ({e}): pass a template of your own") from e


@lru_cache(maxsize=8)
def template_variables(source: str | None) -> frozenset[str]:
    """The variables a template reads from its caller (e.g. whether it renders `tools`)."""
    import jinja2
    from jinja2 import meta

    compile_template(source or CHATML_TEMPLATE)  # a broken template raises ChatTemplateError here
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return frozenset(meta.find_undeclared_variables(env.parse(source or CHATML_TEMPLATE)))


def render_chat(
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **variables,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with `template` (ChatML if None)."""
    import jinja2

    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of dicts with 'role' and 'content' keys")
    compiled = compile_template(template or CHATML_TEMPLATE)
    try:
        return compiled.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **variables,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template failed on this conversation ({e})") from e
