"""Corrupted model files never crash (issue 25): hypothesis mutates a tiny GGUF (header, metadata
values and types, metadata bytes, tensor infos, tensor data, truncation) and a tiny HF folder
(config.json fields, the safetensors header); every case either loads and generates two tokens or
ends in one single-line `LowgearError`. Bounded for CI (derandomized, EXAMPLES per target); the long
run is benchmarks/fuzz_files.py --examples N."""

import os

import pytest

pytest.importorskip("gguf")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz_files_lib import TARGETS, Bases, run_case  # noqa: E402

EXAMPLES = int(os.environ.get("LOWGEAR_FUZZ_EXAMPLES", "100"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return Bases.make(str(tmp_path_factory.mktemp("fuzz_bases")))


@pytest.mark.parametrize("name", list(TARGETS))
def test_corrupted_files_load_or_fail_cleanly(name, bases, tmp_path):
    target = TARGETS[name]
    tried = {"ok": 0, "error": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(target.strategy)
    def case(mutation):
        kind, detail = run_case(target, bases, mutation, str(tmp_path))
        assert kind != "crash", f"{name} {mutation!r}: {detail}"
        tried[kind] += 1

    case()
    assert tried["error"] > 0 or name == "gguf_data", f"{name}: no case was refused; the mutations do nothing"


def test_the_harness_sees_a_crash(bases, tmp_path, monkeypatch):
    """A loader that raises a non-lowgear exception is reported as a crash (the harness can fail)."""
    import fuzz_files_lib

    def broken(path):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(fuzz_files_lib, "load_and_generate", broken)
    kind, detail = run_case(TARGETS["gguf_data"], bases, (0, b"\0", False), str(tmp_path))
    assert kind == "crash" and "IndexError" in detail
