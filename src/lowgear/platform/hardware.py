"""Device facts: the only module that reads torch.cuda, NVML and CUDA_* environment variables.

`list_devices()` answers "which devices can this process use, and what are they": each CUDA device
torch sees (name, compute capability, memory, UUID, PCI bus id, datasheet bandwidth and peak), then
the CPU. CUDA numbers GPUs fastest-first unless CUDA_DEVICE_ORDER=PCI_BUS_ID, while nvidia-smi
numbers them by PCI bus; UUIDs tie the two together, so a device named by UUID or PCI bus id always
resolves to the CUDA index torch uses. `LOWGEAR_SIMULATE` replaces the real devices by datasheet
profiles ("t4", "a100,t4", ...), so the attention ladder, the dtype policy and placement can be
tested and planned on a machine without those GPUs; nothing can run on a simulated device.

Simulation grammar (comma separated): a profile name, optionally `@BUS` (hex PCI bus number) to place
it on the PCI bus; profiles without `@BUS` sit in the order listed. One optional `arch=sm_70+sm_75`
entry declares the arch list of a hypothetical torch build (default: a CUDA 12.6 build's list).
"""

from __future__ import annotations

import os
import re
import time
import uuid as _uuid
from dataclasses import dataclass, replace

import torch

from . import env
from ..errors import ConfigError, DeviceError

GB = 10**9


@dataclass(frozen=True)
class DeviceInfo:
    index: int  # CUDA index (as torch numbers it), -1 for the CPU
    kind: str  # "cpu" or "cuda"
    name: str
    compute_capability: tuple[int, int] | None = None
    total_memory: int = 0  # bytes
    free_memory: int = 0  # bytes
    uuid: str | None = None  # "GPU-xxxxxxxx-...."
    pci_bus_id: str | None = None  # "00000000:04:00.0" (NVML's form)
    bandwidth: float | None = None  # bytes/s, datasheet
    fp16_flops: float | None = None  # dense fp16 tensor-core peak, FLOP/s
    sm_count: int | None = None
    simulated: bool = False  # a simulated profile: nothing can run on it
    nvml_index: int | None = None  # nvidia-smi's number for it (PCI order)
    profile: str | None = None  # the datasheet profile it matched ("t4", ...)
    torch_arch_list: tuple[str, ...] | None = None  # a simulated torch build's arch list
    native_capability: tuple[int, int] | None = None  # under LOWGEAR_EMULATE_SM: the real one (ops/emulate.py)

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.index)

    @property
    def label(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def sm(self) -> str | None:
        """"sm_75" for a compute capability of (7, 5); None for the CPU."""
        cc = self.compute_capability
        return None if cc is None else f"sm_{cc[0]}{cc[1]}"

    def describe(self) -> str:
        return "cpu (CPU)" if self.kind == "cpu" else f"{self.label} ({self.name}, {self.sm})"


def cpu_device() -> DeviceInfo:
    return DeviceInfo(index=-1, kind="cpu", name="CPU")


# Datasheet figures. Memory is approximately what torch reports on the real card.
@dataclass(frozen=True)
class Profile:
    name: str
    cc: tuple[int, int]
    memory: int
    bandwidth: float
    fp16_flops: float
    sms: int
    match: tuple[str, ...]  # lower-case substrings of the CUDA device name


PROFILES: dict[str, Profile] = {
    "p100": Profile("Tesla P100-PCIE-16GB", (6, 0), 17_071_734_784, 732 * GB, 19e12, 56, ("p100",)),
    "v100": Profile("Tesla V100-SXM2-16GB", (7, 0), 16_935_682_048, 900 * GB, 125e12, 80, ("v100",)),
    "v100-32gb": Profile("Tesla V100-SXM2-32GB", (7, 0), 34_089_730_048, 900 * GB, 125e12, 80, ("v100", "32gb")),
    "t4": Profile("Tesla T4", (7, 5), 15_835_660_288, 320 * GB, 65e12, 40, ("t4",)),
    "a10": Profile("NVIDIA A10", (8, 6), 23_836_098_560, 600 * GB, 125e12, 72, ("a10",)),
    "l4": Profile("NVIDIA L4", (8, 9), 23_580_639_232, 300 * GB, 121e12, 58, ("l4",)),
    "a100-40gb": Profile("NVIDIA A100-SXM4-40GB", (8, 0), 42_298_834_944, 1555 * GB, 312e12, 108, ("a100", "40gb")),
    "a100": Profile("NVIDIA A100-SXM4-80GB", (8, 0), 85_100_068_864, 2039 * GB, 312e12, 108, ("a100",)),
    "h100": Profile("NVIDIA H100 80GB HBM3", (9, 0), 85_045_870_592, 3350 * GB, 989e12, 132, ("h100",)),
    # the SXM part (141 GB HBM3e); torch reports 139.80 GiB on a real one
    "h200": Profile("NVIDIA H200", (9, 0), 150_110_000_000, 4800 * GB, 989e12, 132, ("h200",)),
}

# The arch list a simulated set assumes unless it declares one: a CUDA 12.6 build of torch.
DEFAULT_SIMULATED_ARCH_LIST = ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")

# Which torch builds carry which archs (PyTorch's published wheels, torch 2.7-2.9 era).
TORCH_BUILDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cu118", ("sm_50", "sm_60", "sm_61", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")),
    ("cu126", ("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90")),
    ("cu128", ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")),
)


def profile_for_name(name: str) -> str | None:
    """The datasheet profile a real CUDA device name matches (most specific first), if any."""
    low = name.lower()
    best = None
    for key, prof in PROFILES.items():
        if all(re.search(rf"\b{re.escape(m)}\b", low) for m in prof.match):
            if best is None or len(prof.match) > len(PROFILES[best].match):
                best = key
    return best


# ---------------------------------------------------------------- identifiers


def normalize_uuid(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if text[:4].upper() in ("GPU-", "MIG-"):
        return text[:4].upper() + text[4:].lower()
    return "GPU-" + text.lower()


_PCI_RE = re.compile(r"^(?:([0-9a-f]{1,8}):)?([0-9a-f]{1,2}):([0-9a-f]{1,2})\.([0-7])$", re.IGNORECASE)


def parse_pci_bus_id(text: str) -> tuple[int, int, int, int] | None:
    """(domain, bus, device, function) from "00000000:04:00.0", "0000:04:00.0" or "04:00.0"."""
    m = _PCI_RE.match(text.strip())
    if not m:
        return None
    domain, bus, dev, fn = m.groups()
    return (int(domain or "0", 16), int(bus, 16), int(dev, 16), int(fn))


def format_pci_bus_id(domain: int, bus: int, device: int = 0, function: int = 0) -> str:
    return f"{domain:08X}:{bus:02X}:{device:02X}.{function}"


# ---------------------------------------------------------------- simulated devices


@dataclass(frozen=True)
class _SimGpu:
    key: str
    profile: Profile
    bus: int


def _parse_simulation(spec: str) -> tuple[list[_SimGpu], tuple[str, ...]]:
    gpus: list[_SimGpu] = []
    arch = DEFAULT_SIMULATED_ARCH_LIST
    next_bus = 1
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item or item == "cpu":
            continue
        if item.startswith("arch="):
            arch = tuple(a.strip() for a in item[5:].split("+") if a.strip())
            continue
        key, _, bus_text = item.partition("@")
        if key not in PROFILES:
            raise DeviceError(f"LOWGEAR_SIMULATE names unknown profile {key!r}: choose from cpu, {', '.join(PROFILES)}")
        bus = int(bus_text, 16) if bus_text else next_bus
        next_bus = bus + 1
        gpus.append(_SimGpu(key, PROFILES[key], bus))
    if len({g.bus for g in gpus}) != len(gpus):
        raise DeviceError(f"LOWGEAR_SIMULATE={spec!r} puts two GPUs on one PCI bus")
    return gpus, arch


def _simulated_devices(spec: str) -> list[DeviceInfo]:
    gpus, arch = _parse_simulation(spec)
    by_pci = sorted(gpus, key=lambda g: g.bus)
    facts = []
    for nvml_index, g in enumerate(by_pci):
        uid = "GPU-" + str(_uuid.uuid5(_uuid.NAMESPACE_URL, f"lowgear-sim/{g.key}/{g.bus}"))
        facts.append((g, nvml_index, uid))
    order = (env.get("CUDA_DEVICE_ORDER") or "FASTEST_FIRST").upper()
    if order != "PCI_BUS_ID":  # CUDA's default: fastest first, ties by PCI bus
        facts.sort(key=lambda f: (-f[0].profile.fp16_flops, f[0].bus))
    facts = _apply_visible(facts, lambda f: f[2])
    devices = []
    for cuda_index, (g, nvml_index, uid) in enumerate(facts):
        p = g.profile
        devices.append(
            DeviceInfo(
                index=cuda_index,
                kind="cuda",
                name=p.name,
                compute_capability=p.cc,
                total_memory=p.memory,
                free_memory=p.memory,
                uuid=uid,
                pci_bus_id=format_pci_bus_id(0, g.bus),
                bandwidth=p.bandwidth,
                fp16_flops=p.fp16_flops,
                sm_count=p.sms,
                simulated=True,
                nvml_index=nvml_index,
                profile=g.key,
                torch_arch_list=arch,
            )
        )
    return devices


def _apply_visible(items: list, uuid_of) -> list:
    """CUDA_VISIBLE_DEVICES as CUDA applies it: indexes or UUID prefixes, up to the first invalid entry."""
    visible = env.get_raw("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return items
    chosen = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.lstrip("-").isdigit():
            i = int(entry)
            if i < 0 or i >= len(items):
                break
            chosen.append(items[i])
            continue
        want = entry.lower()
        want = want if want.startswith(("gpu-", "mig-")) else "gpu-" + want
        hits = [it for it in items if uuid_of(it).lower().startswith(want)] if entry else []
        if len(hits) != 1:
            break
        chosen.append(hits[0])
    seen, out = set(), []
    for it in chosen:
        if id(it) not in seen:
            seen.add(id(it))
            out.append(it)
    return out


# ---------------------------------------------------------------- real devices


def _nvml_table() -> list[dict]:
    """NVML's view of every GPU (not filtered by CUDA_VISIBLE_DEVICES); [] without pynvml or a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    rows = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uid = pynvml.nvmlDeviceGetUUID(h)
            bus = pynvml.nvmlDeviceGetPciInfo(h).busId
            uid = uid.decode() if isinstance(uid, bytes) else uid
            bus = bus.decode() if isinstance(bus, bytes) else bus
            parsed = parse_pci_bus_id(bus)
            rows.append({"index": i, "uuid": normalize_uuid(uid), "pci": format_pci_bus_id(*parsed) if parsed else bus})
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return rows


def _cuda_devices() -> list[DeviceInfo]:
    if not torch.cuda.is_available():
        return []
    nvml = {row["uuid"]: row for row in _nvml_table()}
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        uid = normalize_uuid(getattr(props, "uuid", None))
        pci = None
        if hasattr(props, "pci_bus_id"):
            pci = format_pci_bus_id(getattr(props, "pci_domain_id", 0), props.pci_bus_id, getattr(props, "pci_device_id", 0))
        row = nvml.get(uid) if uid else None
        if row is not None:
            pci = row["pci"] or pci
        try:
            free, total = torch.cuda.mem_get_info(i)
        except Exception:
            free, total = props.total_memory, props.total_memory
        key = profile_for_name(props.name)
        prof = PROFILES.get(key) if key else None
        cc, native, name = (props.major, props.minor), None, props.name
        emulated = emulated_capability()
        if emulated is not None and emulated < cc:
            cc, native, name = emulated, cc, f"{props.name} as sm_{emulated[0]}{emulated[1]}"
        devices.append(
            DeviceInfo(
                index=i,
                kind="cuda",
                name=name,
                compute_capability=cc,
                native_capability=native,
                total_memory=int(total),
                free_memory=int(free),
                uuid=uid,
                pci_bus_id=pci,
                bandwidth=prof.bandwidth if prof else None,
                fp16_flops=prof.fp16_flops if prof else None,
                sm_count=props.multi_processor_count,
                nvml_index=row["index"] if row else None,
                profile=key,
            )
        )
    return devices


_CACHE: dict[tuple, list[DeviceInfo]] = {}
EMULATED = {"70": (7, 0), "75": (7, 5)}


def emulated_capability() -> tuple[int, int] | None:
    """The compute capability LOWGEAR_EMULATE_SM asks real GPUs to run as (ops/emulate.py), or None."""
    value = env.get("LOWGEAR_EMULATE_SM")
    if value is None:
        return None
    key = value.lower().removeprefix("sm_").replace(".", "")
    if key not in EMULATED:
        raise ConfigError(f"LOWGEAR_EMULATE_SM={value!r}: choose 70 (V100) or 75 (T4), or unset it")
    return EMULATED[key]


def simulated() -> str | None:
    """The LOWGEAR_SIMULATE value in force (None: real devices)."""
    return env.get("LOWGEAR_SIMULATE")


def list_devices(refresh: bool = False) -> list[DeviceInfo]:
    """Every device this process may use: CUDA devices in torch's numbering, then the CPU."""
    sim = simulated()
    key = (sim, env.get_raw("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"), env.get("LOWGEAR_EMULATE_SM"))
    if refresh or key not in _CACHE:
        gpus = _simulated_devices(sim) if sim is not None else _cuda_devices()
        _CACHE[key] = gpus + [cpu_device()]
    return list(_CACHE[key])


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """Compute capability of a torch CUDA device (None for the CPU, or where the device is simulated)."""
    if device.type != "cuda":
        return None
    for d in list_devices():
        if d.kind == "cuda" and not d.simulated and d.index == device.index:
            return d.compute_capability
    return None


def torch_arch_list(device: DeviceInfo | None = None) -> tuple[str, ...]:
    """The arch list of the torch build in use (a simulated device's declared one)."""
    if device is not None and device.torch_arch_list is not None:
        return device.torch_arch_list
    try:
        return tuple(torch.cuda.get_arch_list())
    except Exception:
        return ()


def arch_list_covers(arch_list, cc: tuple[int, int]) -> bool:
    """Whether a build with these archs runs on `cc`: SASS sm_XY runs on X.Z for Z >= Y; PTX compute_XY JITs for any cc >= X.Y."""
    for arch in arch_list:
        m = re.match(r"^(sm|compute)_(\d+?)(\d)([a-z]?)$", arch)
        if not m:
            continue
        kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix:  # arch-specific ("sm_90a"): that exact capability only
            if (major, minor) == cc:
                return True
        elif kind == "sm" and major == cc[0] and minor <= cc[1]:
            return True
        elif kind == "compute" and (major, minor) <= cc:
            return True
    return False


def torch_arch_supported(device: DeviceInfo) -> bool:
    if device.kind == "cpu":
        return True
    return arch_list_covers(torch_arch_list(device), device.compute_capability or (0, 0))


def torch_build_hint(device: DeviceInfo) -> str:
    """What to install when the torch build in use does not carry `device`'s arch."""
    cc = device.compute_capability or (0, 0)
    builds = [tag for tag, archs in TORCH_BUILDS if arch_list_covers(archs, cc)]
    have = " ".join(torch_arch_list(device)) or "none (a CPU-only build)"
    if builds:
        tag = builds[-1]
        fix = f"install a torch build that does, e.g. pip install torch --index-url https://download.pytorch.org/whl/{tag}"
    else:
        fix = "no current PyTorch wheel carries it; build torch from source with TORCH_CUDA_ARCH_LIST including it"
    return f"this torch build carries [{have}], not {device.sm} ({device.name}): {fix}"


def default_devices() -> list[DeviceInfo]:
    """Every usable GPU, else the CPU."""
    gpus = [d for d in list_devices() if d.kind == "cuda" and torch_arch_supported(d)]
    return gpus or [cpu_device()]


def resolve_devices(requested) -> list[DeviceInfo]:
    """Devices named by index ("0", "cuda:1"), "cpu", UUID (or a unique prefix) or PCI bus id."""
    if requested is None:
        return default_devices()
    if isinstance(requested, (str, int)):
        requested = [p for p in str(requested).split(",") if p.strip()]
    devices = list_devices()
    gpus = [d for d in devices if d.kind == "cuda"]
    out: list[DeviceInfo] = []
    for item in requested:
        dev = _resolve_one(str(item).strip(), gpus)
        if dev.kind == "cuda" and not torch_arch_supported(dev):
            raise DeviceError(f"{dev.describe()} cannot be used: {torch_build_hint(dev)}")
        if dev in out:
            raise DeviceError(f"device {dev.label} is named twice in {list(requested)}")
        out.append(dev)
    if not out:
        return default_devices()
    return out


def _available(gpus: list[DeviceInfo]) -> str:
    rows = [f"{d.label} {d.name} uuid={d.uuid} pci={d.pci_bus_id}" for d in gpus]
    return "; ".join(rows + ["cpu"])


def _resolve_one(text: str, gpus: list[DeviceInfo]) -> DeviceInfo:
    low = text.lower()
    if low == "cpu":
        return cpu_device()
    index_text = low[5:] if low.startswith("cuda:") else ("0" if low == "cuda" else low)
    if index_text.isdigit():
        i = int(index_text)
        if i < len(gpus):
            return gpus[i]
        raise DeviceError(f"no CUDA device {text!r}: {len(gpus)} visible. Available: {_available(gpus)}")
    pci = parse_pci_bus_id(text)
    if pci is not None:
        for d in gpus:
            if d.pci_bus_id and parse_pci_bus_id(d.pci_bus_id) == pci:
                return d
        raise DeviceError(f"no visible GPU at PCI bus id {text!r}. Available: {_available(gpus)}")
    if low.startswith(("gpu-", "mig-")) or re.fullmatch(r"[0-9a-f]{4,}(-[0-9a-f-]*)?", low):
        want = low if low.startswith(("gpu-", "mig-")) else "gpu-" + low
        hits = [d for d in gpus if d.uuid and d.uuid.lower().startswith(want)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            names = ", ".join(f"{d.label} {d.uuid}" for d in hits)
            raise DeviceError(f"UUID prefix {text!r} is ambiguous, it matches {names}: give more characters")
        raise DeviceError(f"no visible GPU with UUID {text!r}. Available: {_available(gpus)}")
    raise DeviceError(
        f"cannot read device {text!r}: use an index (0, cuda:1), 'cpu', a UUID (GPU-…, or a unique prefix) "
        f"or a PCI bus id (0000:04:00.0). Available: {_available(gpus)}"
    )


def with_free_memory(device: DeviceInfo, free: int) -> DeviceInfo:
    """A copy of `device` with another free-memory figure (for planning what-ifs)."""
    return replace(device, free_memory=free)


def free_cores(sample_s: float = 0.05, stat_path: str = "/proc/stat") -> int | None:
    """Cores of this process's affinity that other programs leave idle, from two reads of the kernel's CPU
    time counters `sample_s` apart (Linux); None where they cannot be read. A CPU step of torch waits for its
    slowest thread, so a thread per core on a machine where another program holds a core runs at the
    descheduled thread's pace (docs/decisions/022-cpu-int4-weights.md)."""
    def idle_total() -> tuple[int, int]:
        with open(stat_path) as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields[:8])  # idle + iowait; no guests

    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        i0, t0 = idle_total()
        time.sleep(sample_s)
        i1, t1 = idle_total()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    online = os.cpu_count() or cores
    idle_cores = (i1 - i0) / (t1 - t0) * online  # the counters sum over every online core
    return max(1, min(cores, round(idle_cores)))
