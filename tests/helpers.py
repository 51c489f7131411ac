"""Test helpers: load small models with lowgear and run whole prompts through them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import lowgear as lg
from lowgear.attention.metadata import build_metadata


def stub_config(**switches):
    """A model-less Config with `switches` set (for stub models that the generator drives)."""
    config = lg.Config()
    for name, value in switches.items():
        setattr(config, name, value)
    return config


def load(path, max_seq_len: int = 512, page_size: int = 16, **switches):
    config = lg.Config(str(path))
    for name, value in switches.items():
        setattr(config, name, value)
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=max_seq_len, page_size=page_size)
    model.load_autosplit(cache)
    return model, cache


def all_logits(model, cache, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), vocab] of one prompt run in one step through pages 0..n."""
    n = len(ids)
    pages = list(range(-(-n // cache.page_size)))
    meta = build_metadata([n], [n], [pages], cache.page_size, device=model.layer_devices[0], logits="all")
    return model.forward(torch.tensor(ids), meta, cache)


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


@contextlib.contextmanager
def interpreter_index_shim():
    """Triton 3.6's interpreter turns a 1-element array into an int with int(arr), which numpy >= 2.3
    refuses for arrays with ndim > 0, so a `range(runtime_int)` loop in a kernel raises TypeError
    under TRITON_INTERPRET=1. This gives its tensors an __index__ for the duration (the compiled path
    is unaffected; without triton it does nothing)."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        yield
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    try:
        yield
    finally:
        interp._patch_lang_tensor = original


LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_quantized_llama(tmp_path, folder_name: str, store, quantization_config: dict | None, vocab: int = 300,
                          drop=None):
    """A tiny random llama written as a quantized HF folder, and transformers' model on the very weights stored.

    `store(name, p, n)` gets each parameter (norms already perturbed away from 1) and the count of
    tensors stored so far; it returns the tensors to write for it, and copies into `p` the float
    weight they decode to. `drop(tensors)` may spoil the dict before it is written (error tests).
    """
    import json

    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            tensors.update(store(name, p, len(tensors)))
    float_dir = tmp_path / "float"
    hf.save_pretrained(float_dir, safe_serialization=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(float_dir, dtype=torch.float32).eval()
    folder = tmp_path / folder_name
    folder.mkdir()
    config = cfg.to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    if drop is not None:
        drop(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return hf, folder


SRC = Path(__file__).resolve().parents[1] / "src"


def compiled_results(script: str, timeout: int = 600):
    """Run `script` (Python source that compiles kernels with `triton.compile` for explicit targets and
    prints "RESULTS" + JSON) in a subprocess without TRITON_INTERPRET, whose interpreter would stand in
    for the compiler, and with lowgear's src on the path; returns the JSON."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULTS"))  # noqa: E741
    return json.loads(line[len("RESULTS"):])


def use_ops(model, ops) -> None:
    """Run `model` with `ops` (an ops.dispatch.Ops) on every device, kernel hooks attached as the load
    would: how tests run the Triton ops on the CPU (under TRITON_INTERPRET=1)."""
    model.ops = {label: ops for label in model.ops}
    model.layer_ops = [ops] * len(model.layers)
    model.attach_kernels()


def hf_greedy(hf_model, ids: list[int], n: int = 32) -> list[int]:
    """transformers' n greedy tokens after `ids` (no stop token; the explicit mask keeps it from masking
    a prompt's pad id, 0, out)."""
    x = torch.tensor([ids])
    return hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].tolist()


def greedy_together(model, cache, prompts: list[list[int]], n: int = 32) -> list[list[int]]:
    """lowgear's n greedy tokens for each prompt, all run as one batch by the DynamicGenerator (so a
    comparison with transformers, one prompt at a time, also shows batching changes no token)."""
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(model.config), max_batch_size=len(prompts))
    jobs = [lg.DynamicJob(torch.tensor([p]), max_new_tokens=n, gen_settings=lg.Sampler.Settings.greedy()) for p in prompts]
    gen.enqueue(jobs)
    while not all(j.finished for j in jobs):
        gen.iterate()
    return [j.generated for j in jobs]


def gguf_writer_for(path, arch: str, cfg, head_dim: int | None = None):
    """A gguf.GGUFWriter for `arch` with the hyperparameters llama.cpp's converter writes from every
    transformers config (key / value length only where `head_dim` is given); the caller adds the rest."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def close_gguf(w, path) -> str:
    """Write a GGUFWriter's header, metadata and tensors, close it, and return the file's path."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def benchmark_module(name: str):
    """benchmarks/NAME.py imported as a module (the benchmarks folder is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
