"""`Config`: the single place for a model's path and every switch, set before the model loads.

Shaped like ExLlamaV2's config so its recipes carry over: `Config(path)` (or `Config()` then
`config.model_dir = ...; config.prepare()`), then switches such as `config.no_flash_attn = True`.
Environment variables (lowgear.platform.env) are folded in by `effective_switches()`, never at import time.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from . import defaults
from .platform import env
from .errors import ConfigError, ModelFormatError

BACKEND_NAMES = defaults.ATTENTION_LADDER
DTYPE_NAMES = defaults.DTYPE_NAMES


@dataclass(frozen=True)
class Switches:
    no_flash_attn: bool
    no_xformers: bool
    no_sdpa: bool
    no_triton: bool
    attn_backend: str | None


class Config:
    def __init__(self, model_dir: str | os.PathLike | None = None):
        self.model_dir: str | None = os.fspath(model_dir) if model_dir is not None else None
        # attention ladder switches
        self.no_flash_attn = False
        self.no_xformers = False
        self.no_sdpa = False
        self.no_triton = False
        self.attn_backend: str | None = None
        self.no_cuda_graphs = False  # decode steps eager (as LOWGEAR_NO_CUDA_GRAPHS=1)
        self.no_pdl = False  # plain kernel launches on sm_90+ (as LOWGEAR_NO_PDL=1)
        self.pdl_release: str | None = None  # auto | loop | wait | start (as LOWGEAR_PDL_RELEASE); None: auto
        self.kv_cache_dtype = "auto"  # KV cache storage: auto (the model dtype) | int8 | fp8_e4m3 | int4; Cache(kv_dtype=) wins
        self.page_size: int | None = None  # KV cache page, tokens (None: defaults.PAGE_SIZE); Cache(page_size=) wins
        # keep q/k/v and gate/up as separate linears (by default each set that shares a format is
        # fused into one at load, model/fuse.py); for A/B measurements
        self.no_fuse = False
        # placement and numerics
        self.devices: list[str] | str | None = None  # indexes, UUIDs, PCI bus ids, or "cpu"
        self.dtype: str | None = None  # None: chosen per device (float32 CPU, fp16 < sm80, bf16 >= sm80)
        self.cpu_weights: str | None = None  # auto | unpacked | packed (as LOWGEAR_CPU_WEIGHTS); None: auto
        self.max_seq_len: int | None = None  # None: the model's own limit
        self.max_input_len = defaults.MAX_INPUT_LEN  # prefill chunk size (tokens per step)
        self.reserve_memory_mb = defaults.RESERVE_MEMORY_MB  # kept free per GPU beyond the plan
        self.spec = None  # ModelSpec, filled by prepare()
        self._source = None
        if self.model_dir is not None:
            self.prepare()

    @property
    def model_path(self) -> str | None:
        return self.model_dir

    def prepare(self) -> "Config":
        """Read the model's header (not its weights) and fill `spec`."""
        if self.model_dir is None:
            raise ConfigError("Config has no model path: set config.model_dir or pass a path to Config(...)")
        if not os.path.exists(self.model_dir):
            raise ModelFormatError(f"model path {self.model_dir!r} does not exist: give a .gguf file or a Hugging Face model folder")
        from .formats import open_weights

        self._source = open_weights(self.model_dir)
        self.spec = self._source.spec
        if self.max_seq_len is None:
            self.max_seq_len = self.spec.max_position_embeddings
        return self

    def arch_compat_overrides(self, quiet: bool = False, warn_only: bool = False) -> None:
        """ExLlamaV2 scripts call this to switch off features an architecture lacks; lowgear's model
        code reads those facts from the spec itself, so there is nothing to override."""

    @property
    def source(self):
        if self._source is None:
            self.prepare()
        return self._source

    def effective_switches(self) -> Switches:
        """Config switches OR'ed with their environment variables; validated."""
        forced = self.attn_backend or env.get("LOWGEAR_ATTN_BACKEND")
        if forced is not None and forced not in BACKEND_NAMES:
            raise ConfigError(f"unknown attention backend {forced!r}: choose one of {', '.join(BACKEND_NAMES)}")
        return Switches(
            no_flash_attn=self.no_flash_attn or env.flag("LOWGEAR_NO_FLASH_ATTN"),
            no_xformers=self.no_xformers or env.flag("LOWGEAR_NO_XFORMERS"),
            no_sdpa=self.no_sdpa or env.flag("LOWGEAR_NO_SDPA"),
            no_triton=self.no_triton or env.flag("LOWGEAR_NO_TRITON"),
            attn_backend=forced,
        )

    def pdl_off(self) -> bool:
        """Plain launches on sm_90+: config.no_pdl or LOWGEAR_NO_PDL=1."""
        return self.no_pdl or env.flag("LOWGEAR_NO_PDL")

    def pdl_release_name(self) -> str:
        """PDL's release mode: config.pdl_release, else LOWGEAR_PDL_RELEASE, else the default (validated)."""
        release = (self.pdl_release or env.get("LOWGEAR_PDL_RELEASE") or defaults.PDL_RELEASE).lower()
        if release not in defaults.PDL_RELEASE_MODES:
            raise ConfigError(f"PDL release {release!r} (config.pdl_release or LOWGEAR_PDL_RELEASE) is not one of "
                              f"{', '.join(defaults.PDL_RELEASE_MODES)}: leave it unset for the default")
        return release

    def cuda_graphs_off(self) -> bool:
        """Whether decode steps run eagerly (config.no_cuda_graphs or LOWGEAR_NO_CUDA_GRAPHS=1)."""
        return self.no_cuda_graphs or env.flag("LOWGEAR_NO_CUDA_GRAPHS")

    def effective_page_size(self) -> int:
        return self.page_size or defaults.PAGE_SIZE

    def requested_dtype(self) -> str | None:
        dtype = self.dtype or env.get("LOWGEAR_DTYPE")
        if dtype is not None and dtype not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPE_NAMES)}")
        return dtype

    def cpu_weights_mode(self) -> str:
        """How packed weights live on a CPU: config.cpu_weights, else LOWGEAR_CPU_WEIGHTS, else the default."""
        mode = (self.cpu_weights or env.get("LOWGEAR_CPU_WEIGHTS") or defaults.CPU_WEIGHTS).lower()
        if mode not in defaults.CPU_WEIGHTS_MODES:
            raise ConfigError(f"CPU weights {mode!r} (config.cpu_weights or LOWGEAR_CPU_WEIGHTS) is not one of "
                              f"{', '.join(defaults.CPU_WEIGHTS_MODES)}")
        return mode

    def requested_devices(self) -> list[str] | None:
        devices = self.devices if self.devices is not None else env.get("LOWGEAR_DEVICES")
        if devices is None:
            return None
        if isinstance(devices, str):
            return [d.strip() for d in devices.split(",") if d.strip()]
        return [str(d) for d in devices]


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft-model", default=None,
                   help="a smaller model sharing the tokenizer that proposes tokens the model checks in one step")
    g.add_argument("--speculate", choices=["ngram"], default=None,
                   help="ngram: propose the tokens that followed the last few tokens' earlier occurrence (no draft model)")
    g.add_argument("--num-draft-tokens", type=int, default=defaults.NUM_DRAFT_TOKENS,
                   help=f"tokens proposed per step (default {defaults.NUM_DRAFT_TOKENS})")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """Device, dtype and attention-ladder switches (shared by generate, chat and serve)."""
    g = p.add_argument_group("device and attention ladder")
    g.add_argument("--devices", default=None, help="comma list: indexes, UUIDs, PCI bus ids, or 'cpu'")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES)
    g.add_argument("--attn-backend", default=None, choices=BACKEND_NAMES)
    g.add_argument("--kv-cache-dtype", default="auto", choices=defaults.KV_CACHE_DTYPES,
                   help="KV cache storage: auto (the model dtype), or 8 / 4 bits with a scale per token and head")
    for name in ("flash-attn", "xformers", "sdpa", "triton"):
        g.add_argument(f"--no-{name}", action="store_true", help=f"skip the {name.replace('-', '_')} rung")


def apply_device_options(config, args) -> None:
    """Copy add_device_options' switches onto a Config (before the model loads)."""
    config.no_flash_attn, config.no_xformers = args.no_flash_attn, args.no_xformers
    config.no_sdpa, config.no_triton = args.no_sdpa, args.no_triton
    config.attn_backend, config.dtype = args.attn_backend, args.dtype
    config.kv_cache_dtype = getattr(args, "kv_cache_dtype", "auto")
    if args.devices:
        config.devices = args.devices


def threads_type(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_type, default=None,
                   help="CPU threads torch may use (default: one per core that other programs leave idle at start)")


def apply_threads(args) -> None:
    """--threads, else one thread per core other programs leave idle (platform.hardware.free_cores): never
    more than torch's own default. Measured on 2 cores with one held by another program: 54 tok/s with one
    thread against 24 with two (docs/decisions/022-cpu-int4-weights.md)."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
        return
    from .platform.hardware import free_cores

    free = free_cores()
    if free is not None and free < torch.get_num_threads():
        torch.set_num_threads(free)
