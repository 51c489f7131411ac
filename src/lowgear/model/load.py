"""Loading a model onto its devices: devices → dtype → placement plan → attention rung, ops → layers → cache.

The order matters: the dtype decides the weights' and cache's bytes, the plan decides each layer's
device from those bytes, and the attention rung is chosen per device for that dtype. Layers load
one at a time (with a progress bar), so peak host memory stays one layer above the mmap'd file.
"""

from __future__ import annotations

from tqdm import tqdm

from ..errors import ConfigError
from ..platform import hardware
from .linear import QuantLinear
from .moe import ExpertLinear
from ..attention.select import model_needs, select_backend
from ..ops import pdl
from ..ops.dispatch import ops_for
from ..platform.dtypes import common_dtype, dtype_bytes
from ..ops.matmul import cpu_head, cpu_int4, repack
from ..platform.placement import cpu_weights, device_bytes
from ..platform.placement import plan as plan_placement


def load_model(model, cache, progress: bool = False, reserve_mb: int | None = None, device_limits_mb=None) -> None:
    config = model.config
    spec = model.spec
    source = config.source
    requested = config.requested_devices()
    devices = hardware.resolve_devices(requested) if requested else hardware.default_devices()
    dtype = common_dtype(devices, config.requested_dtype())
    held = repack.gpu_held_bytes if any(d.kind != "cpu" for d in devices) else None  # GGUF linears a GPU rewrites
    per_layer, other, _ = device_bytes(source, spec, dtype_bytes(dtype), held)
    kv_bytes_per_token_layer = cache.bytes_per_token_per_layer(cache.dtype or dtype)  # (8-bit kv_dtype: its own bytes)
    reserve = (config.reserve_memory_mb if reserve_mb is None else reserve_mb) * 2**20
    limits = None
    if device_limits_mb is not None:
        limits = [int(m * 2**20) for m in device_limits_mb]
    plan = plan_placement(
        spec,
        per_layer,
        other,
        devices,
        kv_bytes_per_token_layer,
        cache.requested_seq_len,
        reserve,
        per_device_limit=limits,
        page_size=cache.page_size,
    )
    model.plan, model.dtype, model.devices = plan, dtype, devices
    model.cpu_weights = None
    if any(devices[i].kind == "cpu" for i in set(plan.layer_device)):
        cache_bytes = kv_bytes_per_token_layer * spec.num_layers * plan.max_seq_len
        model.cpu_weights = cpu_weights(source, config.cpu_weights_mode(), dtype_bytes(dtype), cache_bytes,
                                        int4_bytes=cpu_int4.sizer())
    choice = model.cpu_weights
    switches = config.effective_switches()
    used = sorted({plan.layer_device[i] for i in range(spec.num_layers)})
    model.selections, model.ops = {}, {}
    pdl.configure(config)
    for idx in used:
        info = devices[idx]
        model.selections[info.label] = select_backend(info, switches, dtype, model_needs(spec), cache.kv_dtype)
        model.ops[info.label] = ops_for(info)

    layer_devs = [devices[plan.layer_device[i]].torch_device for i in range(spec.num_layers)]
    get = source.get
    model.layers, model.layer_devices, model.layer_ops = [], [], []
    bar = tqdm(total=spec.num_layers + 1, desc=f"loading {spec.name or spec.arch}", unit="layer", disable=not progress)
    try:
        for i in range(spec.num_layers):
            model.layers.append(_held_on_cpu(model.build_layer(i, get, layer_devs[i], dtype), choice, dtype))
            model.layer_devices.append(layer_devs[i])
            model.layer_ops.append(model.ops[devices[plan.layer_device[i]].label])
            bar.update(1)
        model.build_ends(get, set(source.names()), layer_devs[0], layer_devs[-1], dtype)
        tied = model.lm_head is model.embed
        _held_on_cpu(model.embed, choice, dtype, int4=False)  # looked up by row: never the int4 kernel's
        if not tied:
            _held_on_cpu(model.lm_head, choice, dtype)
        if choice is not None and choice.int4:  # a float32 head read in bfloat16 at 2+ rows (ops/matmul/cpu_head.py)
            cpu_head.hold(model.lm_head)
        bar.update(1)
    finally:
        bar.close()
    model.attach_kernels()
    cache.allocate(plan.max_seq_len)


def _held_on_cpu(module, choice, dtype, int4: bool = True):
    """Hold every packed linear of `module` that sits on a CPU as the CPU's choice says
    (platform.placement.cpu_weights): 4-bit layers for the int4 kernel (ops/matmul/cpu_int4.py), the
    others unpacked into float weights, or left packed. A tied head is the embedding (int4=False)."""
    if choice is None:
        return module
    for m in module.modules():
        if not (isinstance(m, (QuantLinear, ExpertLinear)) and m.packed and m.device.type == "cpu"):
            continue
        if int4 and choice.int4 and isinstance(m, QuantLinear) and cpu_int4.hold(m):
            continue
        if choice.unpack:
            m.unpack_(dtype)
    return module


def speculation_kwargs(args, model, cache, progress: bool = False) -> dict:
    """The DynamicGenerator's speculative-decoding arguments from the CLI options (the draft loaded here)."""
    from .. import defaults
    from ..cache.kv import Cache
    from ..config import Config
    from .model import Model

    draft_path = getattr(args, "draft_model", None)
    speculate = getattr(args, "speculate", None)
    if draft_path and speculate:
        raise ConfigError("give either --draft-model or --speculate ngram, not both")
    kwargs = {"speculate": speculate, "num_draft_tokens": getattr(args, "num_draft_tokens", defaults.NUM_DRAFT_TOKENS)}
    if draft_path:
        draft_config = Config(draft_path)
        draft_config.devices = model.config.devices
        draft = Model(draft_config)
        draft_cache = Cache(draft, max_seq_len=cache.max_seq_len, page_size=cache.page_size)
        draft.load_autosplit(draft_cache, progress=progress)
        kwargs.update(draft_model=draft, draft_cache=draft_cache)
    return kwargs
