"""`Model`: builds the Llama-family network from a WeightSource, places it, and runs a step.

The model holds weights and is otherwise stateless: `forward(input_ids, meta, cache)` reads the
step's metadata and writes/reads the cache it is given. Loading is layer by layer onto the devices
a placement plan names (one device on a CPU machine); hidden states and metadata move between
devices at the layer where the plan switches device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention.metadata import StepMetadata
from ..errors import ConfigError
from ..formats.spec import ModelSpec
from .fuse import fuse_linear
from .layers import MLP, Attention, DecoderLayer, RMSNorm
from .linear import QuantLinear
from .moe import ExpertLinear, SparseMoE
from .rope import attention_factor, cos_sin, inv_frequencies, uses_long_factors

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class Model:
    def __init__(self, config):
        self.config = config
        self.spec: ModelSpec = config.spec if config.spec is not None else config.prepare().spec
        self.layers: list[DecoderLayer] = []
        self.layer_devices: list[torch.device] = []
        self.embed: QuantLinear | None = None
        self.norm: RMSNorm | None = None
        self.lm_head: QuantLinear | None = None
        self.dtype: torch.dtype | None = None
        self.devices: list = []  # hardware.DeviceInfo per device used
        self.selections: dict[str, object] = {}  # device label -> attention.select.Selection
        self.ops: dict[str, object] = {}  # device label -> ops.dispatch.Ops, resolved at load
        self.layer_ops: list = []  # each layer's device's Ops
        self.plan = None
        self.cpu_weights = None  # platform.placement.CpuWeights when a CPU holds layers: unpacked or packed, and why
        self._rope_tables: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor, bool]] = {}
        # per layer: whether it rotates with the sliding layers' own RoPE base (gemma3)
        self._local_rope = tuple(self.spec.local_rope(i) for i in range(self.spec.num_layers))

    # ---------------------------------------------------------------- loading
    @property
    def loaded(self) -> bool:
        return bool(self.layers)

    def load(self, progress: bool = False, device: str | None = None) -> "Model":
        """Load every layer onto one device (the first requested one, else the best available)."""
        if device is not None:
            self.config.devices = [device]
        from ..cache import Cache

        return self.load_autosplit(Cache(self, max_seq_len=256, lazy=True), progress=progress)

    def load_autosplit(self, cache, progress: bool = False, reserve_mb: int | None = None, device_limits_mb=None) -> "Model":
        """Plan which layers go on which device (weights + this cache's share), load, allocate the cache."""
        from .load import load_model

        load_model(self, cache, progress=progress, reserve_mb=reserve_mb, device_limits_mb=device_limits_mb)
        return self

    def build_layer(self, i: int, get, device: torch.device, dtype: torch.dtype) -> DecoderLayer:
        spec = self.spec
        pre = f"layers.{i}."
        fuse = not getattr(self.config, "no_fuse", False)

        def bias(name: str):
            return get(pre + name + "_bias") if spec.attention_bias and name in ("q", "k", "v") else None

        def linear(name: str) -> QuantLinear:
            return _to(QuantLinear(get(pre + name), bias(name)), device, dtype)

        def linears(names: tuple[str, ...]):
            """One fused QuantLinear over `names`' output rows where their formats allow it, else a tuple.

            The parts are concatenated where the source left them (host memory) and the fused
            weight alone moves to the device, so device memory never holds parts and fused at once.
            """
            weights = [get(pre + n) for n in names]
            biases = [bias(n) for n in names]
            fused = fuse_linear(weights, biases) if fuse else None
            if fused is None:
                return tuple(_to(QuantLinear(w, b), device, dtype) for w, b in zip(weights, biases))
            del weights, biases
            return _to(QuantLinear(*fused), device, dtype)

        def norm(name: str) -> RMSNorm:
            return RMSNorm(get(pre + name).to(device=device, dtype=torch.float32), spec.rms_norm_eps)

        qk_norms = (norm("q_norm"), norm("k_norm")) if spec.qk_norm else (None, None)
        attn = Attention(spec, linears(("q", "k", "v")), linear("o"), *qk_norms, layer=i)
        if spec.is_moe_layer(i):  # experts stay stacked and packed; gate|up fused per expert
            e = spec.num_experts
            experts = ExpertLinear([get(pre + "gate_exps"), get(pre + "up_exps")], e)
            shared = ((MLP(linears(("shared_gate", "shared_up")), linear("shared_down")), linear("shared_expert_gate"))
                      if spec.shared_expert_intermediate_size else ())
            mlp = SparseMoE(linear("router"), _to(experts, device, dtype), _to(ExpertLinear([get(pre + "down_exps")], e), device, dtype),
                            spec.num_experts_per_tok, spec.norm_topk_prob, *shared)
        else:
            mlp = MLP(linears(("gate", "up")), linear("down"), gelu=spec.gemma_block)
        post = (norm("post_attn_norm"), norm("post_ffn_norm")) if spec.gemma_block else ()
        return DecoderLayer(norm("attn_norm"), attn, norm("ffn_norm"), mlp, *post)

    def build_ends(self, get, names: set[str], first: torch.device, last: torch.device, dtype: torch.dtype) -> None:
        self.embed = _to(QuantLinear(get("embed")), first, dtype)
        self.norm = RMSNorm(get("norm").to(device=last, dtype=torch.float32), self.spec.rms_norm_eps)
        if "lm_head" in names:
            self.lm_head = _to(QuantLinear(get("lm_head")), last, dtype)
        elif first == last:
            self.lm_head = self.embed
        else:
            self.lm_head = _to(QuantLinear(get("embed")), last, dtype)

    def attach_kernels(self) -> int:
        """Give each linear the kernel hook its device's ops choose (ops/dispatch.py: the packed or float
        GEMV kernels where Triton may run, else none and the torch path); returns how many got one."""
        count = 0
        modules = [m for layer in self.layers for m in layer.modules()] + [self.lm_head]
        for m in modules:
            if isinstance(m, SparseMoE):
                m.kernel = self.ops[_label(m.router.device)].experts_kernel(m)
                count += m.kernel is not None
            elif isinstance(m, QuantLinear):
                kernel = self.ops[_label(m.device)].linear_kernel(m)
                if kernel is not None:
                    m.kernel = kernel
                    count += 1
        return count

    def backend_for(self, device: torch.device, is_decode: bool = False):
        """The attention rung for a step on `device`: the chosen one, or its decode rung (the capturable one)
        for pure decode steps and graphed steps."""
        return self.selections[_label(device)].backend_for(is_decode)

    # ---------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: StepMetadata, cache) -> torch.Tensor:
        """input_ids [T] -> logits [len(meta.logit_indices), vocab] in float32.

        Each layer hands back its MLP output unadded; the next layer's norm (or the final one) adds it.
        """
        if not self.loaded:
            raise ConfigError("the model is not loaded: call model.load() or model.load_autosplit(cache) first")
        device, ops = self.layer_devices[0], self.layer_ops[0]
        h = self.embed.lookup(input_ids.to(device)).to(self.dtype)  # [T, hidden]
        if self.spec.gemma_block:  # times sqrt(hidden) rounded to the activation dtype, as transformers' Gemma
            h = h * float(torch.tensor(self.spec.hidden_size**0.5, dtype=self.dtype))
        meta_here = meta.to(device)
        tables = self._rope_tables_on(device, cache)
        pending = None
        for i, layer in enumerate(self.layers):
            if self.layer_devices[i] != device:
                device, ops = self.layer_devices[i], self.layer_ops[i]
                h, pending, meta_here = h.to(device), pending.to(device), meta.to(device)
                tables = self._rope_tables_on(device, cache)
            k_cache, v_cache = cache.layer(i)
            h, pending = layer.forward(h, pending, tables[self._local_rope[i]], meta_here, k_cache, v_cache,
                                       self.backend_for(device, meta.is_decode or meta.graphed), ops)
        rows = meta_here.logit_indices
        h, _ = self.norm.forward(pending.index_select(0, rows), ops, residual=h.index_select(0, rows))
        logits = self.lm_head(h).float()
        cap = self.spec.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def _rope_tables_on(self, device: torch.device, cache) -> tuple:
        """(global, local) RoPE tables on `device`; local is the global one unless the sliding layers have their own base."""
        table = self._rope_table(device, cache)
        return (table, self._rope_table(device, cache, local=True) if any(self._local_rope) else table)

    def rope_tables(self) -> tuple:
        """The RoPE tables built so far (what a captured step reads: its holder keeps them alive)."""
        return tuple(self._rope_tables.values())

    def _rope_table(self, device: torch.device, cache, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [positions, rot/2] float32 for every position the cache can hold, built once.

        The first (eager) step builds it, before any graph capture; a larger cache rebuilds it (and
        LongRoPE's choice of factors follows the cache, model/rope.py).
        """
        # positions stay below the cache's capacity (a sequence must fit in it); the kernel does not
        # bounds-check, so a cache without one gets the model's whole context
        n = getattr(cache, "capacity_tokens", 0) or self.spec.max_position_embeddings
        long = uses_long_factors(self.spec, n) and not local
        table = self._rope_tables.get((device, local))
        if table is None or table[0].shape[0] < n or table[2] != long:
            positions = torch.arange(n, device=device)
            freqs = inv_frequencies(self.spec, long, local).to(device)
            scale = 1.0 if local else attention_factor(self.spec)
            table = self._rope_tables[device, local] = (*cos_sin(positions, freqs, scale), long)
        return table[0], table[1]

    def unload(self) -> None:
        self.layers, self.layer_devices, self.embed, self.norm, self.lm_head = [], [], None, None, None
        self.selections, self.ops, self.layer_ops = {}, {}, []


def _to(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype)


def _label(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else f"cuda:{device.index}"
