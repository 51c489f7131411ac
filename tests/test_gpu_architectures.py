"""On a CUDA GPU: each architecture beyond llama (qwen3, gemma2, gemma3 with head_dim 256, Phi-3 with a
sliding window and Phi-4-mini-like LongRoPE over 0.75 of a head) in float16 on
the sdpa, triton and eager rungs, and as a T4 / V100 runs it (the ladder walked as for sm_75), against
the CPU float32 eager path on the same weights (transformers' own tiny random models, written by the
CPU tests' writers). A rung the model cannot use (sdpa with Gemma 2's soft-capping) must refuse with
its reason, never run. Skipped without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import all_logits, load
from lowgear.errors import BackendUnavailableError

pytestmark = pytest.mark.gpu
pytest.importorskip("transformers")


def _folder(tmp_path, arch):
    from test_model_gemma import MODELS, write_gemma
    from test_model_qwen3 import write_qwen3

    if arch == "qwen3":
        write_qwen3(tmp_path)
    elif arch.startswith("phi3-"):  # test_model_phi3's variants: a sliding window; LongRoPE over 0.75 of a head, tied
        from test_model_phi3 import write_phi3

        write_phi3(tmp_path, arch.removeprefix("phi3-"))
    else:
        shape = dict(MODELS[arch])
        write_gemma(tmp_path, shape.pop("arch"), **shape)
    return tmp_path


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3", "gemma3_hd256", "phi3-window",
                                  "phi3-longrope-partial75-tied"])
@pytest.mark.parametrize("rung", ["sdpa", "triton", "eager", "t4-v100"])
def test_fp16_rung_matches_cpu_float32(tmp_path, arch, rung):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    folder = _folder(tmp_path, arch)
    ids = torch.randint(3, 290, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_model, ref_cache = load(folder, devices=["cpu"], dtype="float32", attn_backend="eager")
    ref = all_logits(ref_model, ref_cache, ids).float()
    if rung == "t4-v100":  # what an sm_75 card's ladder picks for this model, run here
        from lowgear.attention.select import model_needs, select_backend
        from lowgear.config import Switches

        model, cache = load(folder, devices=["0"], dtype="float16", no_flash_attn=True)
        info = model.devices[0]
        old = dataclasses.replace(info, compute_capability=(7, 5), name=f"{info.name} as sm_75")
        model.selections[info.label] = select_backend(old, Switches(True, False, False, False, None), torch.float16,
                                                      model_needs(model.spec))
    elif arch == "gemma2" and rung == "sdpa":
        with pytest.raises(BackendUnavailableError, match="soft-cap"):
            load(folder, devices=["0"], dtype="float16", attn_backend="sdpa")
        return
    else:
        model, cache = load(folder, devices=["0"], dtype="float16", attn_backend=rung)
    out = all_logits(model, cache, ids).float().cpu()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, (arch, rung, rel)  # fp16 weights and activations: ~1e-3; a wrong mask or cap is O(1)
