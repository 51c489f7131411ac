"""An ExLlamaV2 user's script, imports switched to lowgear, on an EXL2 folder made by ExLlamaV2.

tests/fixtures/exllamav2/seed_script.py is written against ExLlamaV2's names (ExLlamaV2Config,
ExLlamaV2Cache(lazy=True), load_autosplit(progress=True), ExLlamaV2DynamicGenerator(paged=True,
max_batch_size=8), warmup, generate on a list, a streamed job through iterate). It runs here as a
user would run it, in its own process; its batched greedy completions must equal each prompt
completed alone through lowgear's own API, and its streamed text the batched one.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import lowgear as lg

FIXTURES = Path(__file__).parent / "fixtures" / "exllamav2"


def test_seed_script_runs_on_exl2_with_paged_batching():
    folder = FIXTURES / "exl2-2.6bpw"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(lg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(FIXTURES / "seed_script.py"), str(folder)], capture_output=True, text=True,
                         timeout=600, env=env, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [ln for ln in run.stdout.splitlines() if " -> " in ln or ln.startswith("stream: ")]
    batched = {}
    for ln in lines[:-1]:
        prompt, completion = ln.split(" -> ", 1)
        batched[ast.literal_eval(prompt)] = ast.literal_eval(completion)
    streamed = ast.literal_eval(lines[-1][len("stream: "):])
    assert len(batched) == 8
    assert streamed == batched["Once upon a time,"]

    config = lg.Config(str(folder))
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=512)
    model.load_autosplit(cache)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(config), max_batch_size=1)
    for prompt, completion in list(batched.items())[:3]:  # the torch path is slow on CPU: three suffice
        alone = gen.generate(prompt, max_new_tokens=8, add_bos=True, gen_settings=lg.Sampler.Settings.greedy(),
                             completion_only=True)
        assert alone == completion, prompt
