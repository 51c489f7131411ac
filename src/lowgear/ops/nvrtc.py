"""CUDA C kernels compiled at run time by NVRTC, loaded through the driver, launched with ctypes.

For the few kernels Triton cannot express on an old card (tensor-core `mma.sync` on sm_75, where Triton's
tl.dot is FMAs). Nothing is built at install: NVRTC ships with torch's CUDA wheels (nvidia-cuda-nvrtc). It
builds for the compute capability lowgear sees (`target`): a cubin for the GPU's own architecture, PTX that
the driver JITs when the GPU runs as an older one (`ops/emulate.py`). Modules are cached per (source,
defines, capability, device).
A launch goes on torch's current stream, so it is captured into CUDA graphs like any other kernel.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from functools import lru_cache

import torch

_MODULES: dict[tuple, object] = {}


class NvrtcMissing(RuntimeError):
    pass


class BuildError(RuntimeError):
    """A kernel could not be compiled or loaded here (old driver for the PTX, NVRTC failure): callers fall
    back to another kernel."""


def _lib_candidates() -> list[str]:
    names = []
    major = (torch.version.cuda or "12").split(".")[0]
    for base in sys.path:  # the pip wheels: nvidia/cuda_nvrtc/lib (CUDA 12), nvidia/cu13/lib (CUDA 13)
        for sub in ("nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib", "nvidia/cu12/lib"):
            names += sorted(glob.glob(os.path.join(base, sub, "libnvrtc.so*")))
    names += [f"libnvrtc.so.{major}", "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return names + sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))


@lru_cache(maxsize=1)
def nvrtc() -> ctypes.CDLL:
    """The NVRTC library (NvrtcMissing, with what to install, when there is none)."""
    for name in _lib_candidates():
        if "builtins" in os.path.basename(name) or ".alt." in os.path.basename(name):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    try:  # torch's own lookup (the library its CUDA build was linked with)
        from torch.cuda._utils import _get_nvrtc_library

        return _get_nvrtc_library()
    except Exception:
        pass
    raise NvrtcMissing("NVRTC (libnvrtc) was not found: it comes with torch's CUDA wheels; "
                       "`pip install nvidia-cuda-nvrtc-cu12` provides it for CUDA 12")


def available() -> str | None:
    """None when NVRTC loads, else why not."""
    try:
        nvrtc()
        return None
    except NvrtcMissing as e:
        return str(e)


def compile_source(source: str, defines: dict[str, int], arch: str) -> bytes:
    """NVRTC output for `arch`: "compute_75" gives PTX, "sm_75" a cubin (what the compile checks use: it runs
    ptxas, so inline PTX is checked too). BuildError with NVRTC's log when the source does not compile."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"lowgear.cu", 0, None, None))
    opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--use_fast_math"]
    opts += [f"-D{k}={int(v)}".encode() for k, v in sorted(defines.items())]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    try:
        if lib.nvrtcCompileProgram(prog, len(opts), arr) != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise BuildError(f"NVRTC could not compile a lowgear kernel for {arch} ({defines}):\n"
                             f"{log.value.decode(errors='replace')}")
        cubin = arch.startswith("sm_")
        get_size, get = ((lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN) if cubin
                         else (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX))
        size = ctypes.c_size_t()
        _check(lib, get_size(prog, ctypes.byref(size)))
        buf = ctypes.create_string_buffer(size.value)
        _check(lib, get(prog, buf))
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check(lib, rc: int) -> None:
    """A failed NVRTC call is a failed build too (the callers' Triton fallback takes over, as for a compile error)."""
    if rc != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise BuildError(f"NVRTC error {rc}: {lib.nvrtcGetErrorString(rc).decode()}")


@lru_cache(maxsize=1)
def _cuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _cu(rc: int, what: str, error=RuntimeError) -> None:
    if rc != 0:
        msg = ctypes.c_char_p()
        _cuda().cuGetErrorString(rc, ctypes.byref(msg))
        raise error(f"CUDA driver error in {what}: {msg.value.decode() if msg.value else rc}")


class Kernel:
    """One compiled kernel on one device; call with grid, block, shared bytes and typed arguments."""

    def __init__(self, image: bytes, name: str, device: torch.device):
        self.device = device
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # the runtime makes the primary context current
            self.module = ctypes.c_void_p()
            _cu(_cuda().cuModuleLoadData(ctypes.byref(self.module), ctypes.c_char_p(image)), "cuModuleLoadData",
                BuildError)
            self.func = ctypes.c_void_p()
            _cu(_cuda().cuModuleGetFunction(ctypes.byref(self.func), self.module, name.encode()),
                "cuModuleGetFunction", BuildError)
        self.max_shared = 48 * 1024

    def set_max_shared(self, nbytes: int) -> None:
        if nbytes > self.max_shared:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            _cu(_cuda().cuFuncSetAttribute(self.func, 8, ctypes.c_int(nbytes)), "cuFuncSetAttribute")
            self.max_shared = nbytes

    def __call__(self, grid: tuple[int, int, int], block: int, shared: int, args: list, pdl: bool = False) -> None:
        """Launch on torch's current stream; pdl: with programmatic stream serialization (sm_90+, ops/pdl.py)."""
        vals = []
        for a in args:
            if isinstance(a, torch.Tensor):
                vals.append(ctypes.c_uint64(a.data_ptr()))
            elif isinstance(a, int):
                vals.append(ctypes.c_int32(a))
            else:
                raise TypeError(f"kernel argument of type {type(a).__name__}")
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
        self.set_max_shared(shared)
        with torch.cuda.device(self.device):  # the module's context current (a layer on another GPU)
            stream = torch.cuda.current_stream(self.device).cuda_stream
            if not pdl:
                _cu(_cuda().cuLaunchKernel(self.func, grid[0], grid[1], grid[2], block, 1, 1, shared,
                                           ctypes.c_void_p(stream), ptrs, None), "cuLaunchKernel")
                return
            attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
            attr.value[0] = 1
            cfg = _LaunchConfig(grid[0], grid[1], grid[2], block, 1, 1, shared, ctypes.c_void_p(stream),
                                ctypes.pointer(attr), 1)
            _cu(_cuda().cuLaunchKernelEx(ctypes.byref(cfg), self.func, ptrs, None), "cuLaunchKernelEx")


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_int), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


def target(capability: tuple[int, int], real: tuple[int, int]) -> str:
    """What NVRTC makes: a cubin for the device's own architecture (a driver older than NVRTC loads it, where
    it could not JIT NVRTC's newer PTX), PTX when running as another one (ops/emulate.py: the driver JITs
    the sm_75 code for the real GPU)."""
    cc = f"{capability[0]}{capability[1]}"
    return f"sm_{cc}" if tuple(capability) == tuple(real) else f"compute_{cc}"


def kernel(source: str, name: str, defines: dict[str, int], device: torch.device,
           capability: tuple[int, int]) -> Kernel:
    """The kernel `name` of `source` with `defines`, built for `capability` and loaded on `device`; cached.
    BuildError where it cannot be built or loaded here."""
    device = torch.device(device)
    key = (hash(source), name, tuple(sorted(defines.items())), capability, device.index)
    k = _MODULES.get(key)
    if k is None:
        real = torch.cuda.get_device_capability(device)
        try:
            image = compile_source(source, defines, target(capability, real))
        except NvrtcMissing as e:
            raise BuildError(str(e)) from e
        k = _MODULES[key] = Kernel(image, name, device)
    return k
