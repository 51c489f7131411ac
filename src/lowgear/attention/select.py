"""Choosing the attention rung for a device: one function over the backends' declared facts and probes.

`select_backend` walks the ladder (flash_attn → xformers → sdpa → triton → eager) and takes the
first rung that the config leaves on, that the device can do (compute capability, dtype, CPU), and
whose probe (a tiny real call) succeeds. Every rung gets a `Decision` with a reason, the log that
`lowgear doctor` prints.

Decode steps are where CUDA graphs pay (docs/decisions/002-graphed-decode-on-triton.md), and only
a capturable rung can be captured. So on a
CUDA device whose chosen rung is not capturable (sdpa, whose padded decode gathers at the step's
real length), the first capturable rung below it that works there (triton) is taken for pure
decode steps — `Selection.decode_backend` — while prefill keeps the chosen rung. Both read and
write the one paged KV layout, and every rung is tested against eager, so the mix is exact up to
each rung's own rounding. Forcing a rung (attn_backend) uses it for every step. On a simulated device nothing can run, so the choice there is made from
capabilities and package presence alone, and says so. Results are cached per device, dtype and
switches, so probes run once per process.

A model may need what not every rung has (`needs`: "softcap" for gemma2's attention-logit
soft-capping, from `model_needs(spec)`): a rung that lacks it is skipped with that reason, so the
ladder, and doctor's table, say which rung runs that model and why the ones above it do not.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass

import torch

from .. import defaults
from ..platform import hardware
from ..errors import BackendUnavailableError, DeviceError
from .base import AttentionBackend, ProbeResult

LADDER = defaults.ATTENTION_LADDER

_CLASSES = {
    "flash_attn": ("lowgear.attention.flash_attn", "FlashAttnBackend"),
    "xformers": ("lowgear.attention.xformers", "XformersBackend"),
    "sdpa": ("lowgear.attention.sdpa", "SdpaBackend"),
    "triton": ("lowgear.attention.triton", "TritonBackend"),
    "eager": ("lowgear.attention.eager", "EagerBackend"),
}

_SWITCHES = {
    "flash_attn": ("no_flash_attn", "LOWGEAR_NO_FLASH_ATTN"),
    "xformers": ("no_xformers", "LOWGEAR_NO_XFORMERS"),
    "sdpa": ("no_sdpa", "LOWGEAR_NO_SDPA"),
    "triton": ("no_triton", "LOWGEAR_NO_TRITON"),
}

STATUSES = ("chosen", "available", "skipped", "unavailable", "disabled", "not tried")


@dataclass(frozen=True)
class Decision:
    name: str
    status: str  # one of STATUSES
    reason: str


@dataclass(frozen=True)
class Selection:
    backend: AttentionBackend
    log: tuple[Decision, ...]
    device: hardware.DeviceInfo
    dtype: torch.dtype
    probed: bool  # False on a simulated device: chosen by capability, never run
    decode: AttentionBackend | None = None  # a capturable rung for pure decode and graphed steps, when `backend` is not
    decode_reason: str = ""

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def decode_backend(self) -> AttentionBackend:
        return self.decode or self.backend

    def backend_for(self, is_decode: bool) -> AttentionBackend:
        return self.decode_backend if is_decode else self.backend

    def decision(self, name: str) -> Decision:
        return next(d for d in self.log if d.name == name)

    def table(self) -> str:
        width = max(len(n) for n in LADDER)
        return "\n".join(f"{d.name:<{width}}  {d.status:<11}  {d.reason}" for d in self.log)


def get_backend(name: str) -> AttentionBackend:
    """A fresh instance of the named rung; its module (and any kernel library) is imported only now."""
    if name not in _CLASSES:
        raise BackendUnavailableError(f"unknown attention backend {name!r}: choose one of {', '.join(LADDER)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)()


def package_present(package: str) -> bool:
    """Whether `package` could be imported, without importing it."""
    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def capabilities_of(backend: AttentionBackend, device):
    per_device = getattr(backend, "capabilities_for", None)
    return per_device(device) if per_device is not None else backend.capabilities


def capability_reason(backend: AttentionBackend, device, dtype: torch.dtype, kv_dtype: str = "auto") -> str | None:
    """Why `device` cannot run `backend` in `dtype` over a `kv_dtype` cache, judged from declared capabilities;
    None when it can."""
    caps = capabilities_of(backend, device)
    if kv_dtype not in caps.kv_dtypes:
        return (f"does not read a KV cache stored in {kv_dtype} (it reads: {', '.join(caps.kv_dtypes)}); "
                "use the eager or sdpa rung, or --kv-cache-dtype auto")
    if device.kind == "cpu":
        if not caps.cpu:
            return "needs a CUDA GPU"
    elif caps.min_compute_capability is not None:
        have = device.compute_capability or (0, 0)
        need = caps.min_compute_capability
        if have < need:
            return f"needs sm_{need[0]}{need[1]} (device is sm_{have[0]}{have[1]})"
    if dtype not in caps.dtypes:
        return f"does not run in {str(dtype).removeprefix('torch.')} on {device.label}"
    return None


def run_probe(backend: AttentionBackend, device, dtype: torch.dtype) -> ProbeResult:
    """The backend's probe in the dtype it will run (where its probe takes one); never raises."""
    try:
        if "dtype" in inspect.signature(backend._probe).parameters:
            return backend._probe(device, dtype=dtype)
        return backend.probe(device)
    except Exception as exc:
        return ProbeResult(False, f"probe call failed: {type(exc).__name__}: {exc}".strip())


# what a model may need of a rung: the Capabilities field, and the reason a rung without it is skipped
NEEDS = {"softcap": "cannot soft-cap attention scores (cap * tanh(s / cap)), which this model needs (attn_logit_softcapping)"}


def model_needs(spec) -> tuple[str, ...]:
    """The rung capabilities (NEEDS' keys) a model of this formats.spec.ModelSpec needs."""
    return ("softcap",) if spec is not None and spec.attn_softcap else ()


def _disabled_reason(name: str, switches) -> str | None:
    if name not in _SWITCHES or switches is None:
        return None
    attr, var = _SWITCHES[name]
    return f"disabled by config.{attr} / {var}" if getattr(switches, attr, False) else None


_CACHE: dict[tuple, Selection] = {}


def clear_cache() -> None:
    _CACHE.clear()


def _default_switches():
    from ..config import Config

    return Config().effective_switches()


def select_backend(device, switches=None, dtype: torch.dtype | None = None, needs: tuple[str, ...] = (),
                   kv_dtype: str = "auto") -> Selection:
    """The first rung of the ladder that runs on `device` (hardware.DeviceInfo) in `dtype` over a `kv_dtype`
    cache and has what the model `needs` (NEEDS' keys), with the log of every rung."""
    if switches is None:
        switches = _default_switches()
    if dtype is None:
        from ..platform.dtypes import default_dtype

        dtype = default_dtype(device)
    key = (device, dtype, switches, tuple(needs), kv_dtype)
    if key in _CACHE:
        return _CACHE[key]
    if device.kind == "cuda" and not hardware.torch_arch_supported(device):
        raise DeviceError(f"{device.describe()} cannot be used: {hardware.torch_build_hint(device)}")
    forced = getattr(switches, "attn_backend", None)
    log: list[Decision] = []
    chosen: AttentionBackend | None = None
    forced_reason = None
    for name in LADDER:
        if chosen is not None:
            log.append(Decision(name, "not tried", f"{chosen.name} was chosen above it"))
            continue
        if forced and name != forced:
            log.append(Decision(name, "not tried", f"attn_backend forces {forced}"))
            continue
        decision, backend = _consider(name, device, dtype, switches, needs, kv_dtype)
        log.append(decision)
        if decision.status == "chosen":
            chosen = backend
        elif forced:
            forced_reason = decision.reason
    if chosen is None:
        if forced:
            raise BackendUnavailableError(
                f"attention backend {forced!r} is forced (config.attn_backend / LOWGEAR_ATTN_BACKEND) but cannot run on "
                f"{device.describe()} in {str(dtype).removeprefix('torch.')}"
                f"{'' if kv_dtype == 'auto' else ' with its KV cache in ' + kv_dtype}: {forced_reason}. "
                "Unset it to let lowgear pick a rung that works."
            )
        table = "; ".join(f"{d.name}: {d.reason}" for d in log)
        raise BackendUnavailableError(f"no attention rung runs on {device.describe()}: {table}")
    decode, decode_reason = None, ""
    if device.kind == "cuda" and not forced and not capabilities_of(chosen, device).capturable:
        for name in LADDER[LADDER.index(chosen.name) + 1 :]:
            decision, backend = _consider(name, device, dtype, switches, needs, kv_dtype)
            if decision.status == "chosen" and capabilities_of(backend, device).capturable:
                decode = backend
                decode_reason = (f"{chosen.name} cannot be captured in a CUDA graph; {name} runs the decode steps "
                                 f"(graphed), {chosen.name} the prefill")
                break
    selection = Selection(chosen, tuple(log), device, dtype, probed=not device.simulated, decode=decode,
                          decode_reason=decode_reason)
    _CACHE[key] = selection
    return selection


def survey(device, switches=None, dtype: torch.dtype | None = None, needs: tuple[str, ...] = ()) -> list[Decision]:
    """Every rung's status on `device`, each probed as if it were the only one (for doctor).

    Unlike select_backend, rungs below the first that works are probed too, so a user sees what
    would take over if the chosen rung were switched off.
    """
    if switches is None:
        switches = _default_switches()
    if dtype is None:
        from ..platform.dtypes import default_dtype

        dtype = default_dtype(device)
    decisions = []
    for name in LADDER:
        decision, _ = _consider(name, device, dtype, switches, needs)
        if decision.status == "chosen":
            decision = Decision(name, "available", decision.reason)
        decisions.append(decision)
    return decisions


def _consider(name: str, device, dtype: torch.dtype, switches, needs: tuple[str, ...] = (),
              kv_dtype: str = "auto") -> tuple[Decision, AttentionBackend | None]:
    disabled = _disabled_reason(name, switches)
    if disabled:
        return Decision(name, "disabled", disabled), None
    try:
        backend = get_backend(name)
    except Exception as exc:  # a rung whose own module is missing or broken
        return Decision(name, "unavailable", f"cannot load lowgear.attention.{name}: {type(exc).__name__}: {exc}"), None
    reason = capability_reason(backend, device, dtype, kv_dtype)
    lacking = [NEEDS[n] for n in needs if not getattr(capabilities_of(backend, device), n)]
    if reason or lacking:
        return Decision(name, "skipped", reason or "; ".join(lacking)), None
    package = capabilities_of(backend, device).package
    if device.simulated:
        if package and not package_present(package):
            return Decision(name, "unavailable", f"{package} is not installed"), None
        return Decision(name, "chosen", "simulated device: chosen by capability and package presence, not probed"), backend
    result = run_probe(backend, device, dtype)
    if not result.available:
        return Decision(name, "unavailable", result.reason), None
    return Decision(name, "chosen", result.reason or "probe call ok"), backend
