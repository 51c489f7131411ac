"""The README's claims, checked against the code: the support table, the CLI table, the Python
examples (run against a tiny random GGUF), the server routes, the doctor excerpt, the paths it
names, and its length and wording."""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_PATH = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README_PATH, encoding="utf-8") as f:
        return f.read()


def section(text: str, title: str) -> str:
    """The text under a heading (any level) up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert m, f"README has no heading {title!r}"
    level = len(m.group(1))
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s\-|]+\|$", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def options_in(cell: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cell))


# ------------------------------------------------------------------------------------ support table


def support_table() -> dict[str, str]:
    return {row[0]: row[1] for row in table_rows(section(readme(), "What it runs"))}


def listed(cell: str) -> list[str]:
    return [w.strip() for w in re.split(r"[,()]", cell) if w.strip()]


def test_support_table_architectures_are_the_codes():
    from lowgear.formats.spec import SUPPORTED_ARCHITECTURES

    assert sorted(listed(support_table()["architectures"])) == sorted(SUPPORTED_ARCHITECTURES)


def test_support_table_gguf_types_are_the_codes():
    from lowgear.formats.blocks import SUPPORTED_TYPES

    assert sorted(listed(support_table()["GGUF weight types"])) == sorted(SUPPORTED_TYPES)


def test_support_table_hf_formats_are_the_readers():
    from lowgear.formats import exl2, gptq
    from lowgear.formats.blocks import FLOAT_TYPES

    cell = support_table()["Hugging Face folders (safetensors)"]
    words = listed(cell)
    assert sorted(w for w in words if w not in ("float", "GPTQ", "AWQ", "EXL2")) == sorted(FLOAT_TYPES)
    assert "GPTQ" in words and "AWQ" in words and "EXL2" in words
    from lowgear.formats import awq  # noqa: F401  (the AWQ reader the table names)
    with open(os.path.join(ROOT, "docs", "models.md")) as f:  # the formats' details, linked from the README
        formats = section(f.read(), "Weight formats")
    assert set(gptq.GPTQ_FORMATS) == set(re.findall(r'"(gptq\w*)"', formats))
    notes = " ".join(formats.split())
    gptq_bits = re.search(r"GPTQ\*\*: .*?([\d/]+) bits", notes).group(1)
    assert tuple(int(b) for b in gptq_bits.split("/")) == gptq.GPTQ_BITS
    exl2_bits = re.search(r"EXL2\*\*: .*?([\d/]+)-bit groups", notes).group(1)
    assert tuple(int(b) for b in exl2_bits.split("/")) == exl2.EXL2_BITS


# ---------------------------------------------------------------------------------------- CLI table


def subparsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from lowgear.cli.main import make_parser

    parser = make_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, dict(action.choices)


def long_options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings if o.startswith("--")} - {"--help"}


def option_groups(text: str) -> dict[str, set[str]]:
    cli = section(text, "CLI")
    groups = {}
    for name, opts in re.findall(r"\*\*(\w+)\*\*\s+((?:`[^`]*`\s*)+)", cli):
        groups[name] = options_in(opts)
    return groups


def readme_cli(text: str) -> dict[str, set[str]]:
    groups = option_groups(text)
    claims = {}
    for row in table_rows(section(text, "CLI")):
        command = row[0].strip("`").split()[0]
        cell = row[2]
        opts = options_in(cell)
        for word in re.findall(r"(?:^|,)\s*([a-z]+)\s*(?=,|$)", cell.replace("`", "")):
            assert word in groups, f"{command}: unknown option group {word!r}"
            opts |= groups[word]
        claims[command] = opts
    return claims


def check_cli(text: str) -> None:
    parser, subs = subparsers()
    claims = readme_cli(text)
    assert set(claims) == set(subs), "the CLI table lists other commands than the parser has"
    for command, opts in claims.items():
        assert opts == long_options(subs[command]), (
            f"{command}: README says {sorted(opts)}, parser has {sorted(long_options(subs[command]))}")
    # --debug belongs to `lowgear` itself, before the command, and the README says so
    assert "--debug" in long_options(parser)
    assert all("--debug" not in long_options(p) for p in subs.values())
    assert "`--debug` is an option of `lowgear` itself (before the command)" in " ".join(text.split())
    for line in section(text, "CLI").splitlines():
        if line.startswith("lowgear --debug"):
            parser.parse_args(line.split("#")[0].split()[1:])


def test_cli_table_matches_the_parsers():
    check_cli(readme())


def test_cli_examples_parse():
    parser, _ = subparsers()
    block = code_blocks(section(readme(), "CLI"), "bash")[0]
    import shlex

    for line in block.splitlines():
        args = shlex.split(line.split("  #")[0])
        assert args[0] == "lowgear"
        parser.parse_args(args[1:])


@pytest.mark.parametrize("plant", [
    ("| `doctor` |", "--model --json --devices --dtype --max-seq-len", "--model --json --devices --dtype --max-seq-len --debug"),
    ("| `bench` |", "--preset --model --quant --device ", "--preset --model --quant --devices "),
    ("--attn-backend --no-flash-attn", "--no-triton`", "--no-triton --no-graphs`"),  # a group
    ("`--debug` is an option", "`--debug` is an option of `lowgear` itself", "`--debug` is an option of every command"),
])
def test_cli_check_catches_a_wrong_claim(plant):
    row, old, new = plant
    text = readme()
    line = next(ln for ln in text.splitlines() if row in ln)
    assert old in line
    with pytest.raises(AssertionError):
        check_cli(text.replace(line, line.replace(old, new)))


# -------------------------------------------------------------------------------- Python examples


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = tmp_path_factory.mktemp("readme") / "tiny.gguf"
    write_gguf(path, arch="llama", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=64, qtype="Q8_0", seed=1)
    return str(path)


def run_example(code: str, model_path: str, monkeypatch) -> dict:
    import lowgear

    monkeypatch.setattr(lowgear, "default_model_path", lambda: model_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_python_quickstart_runs(tiny_model, monkeypatch, capsys):
    first, jobs = code_blocks(section(readme(), "Python"), "python")
    scope = run_example(first, tiny_model, monkeypatch)
    assert scope["path"] == tiny_model
    exec(compile(jobs, "README.md", "exec"), scope)
    out = capsys.readouterr().out
    assert re.search(r"\| (stop_token|stop_string|max_new_tokens)$", out.strip())


def test_exllamav2_example_runs(tiny_model, monkeypatch, capsys):
    (code,) = code_blocks(section(readme(), "Coming from ExLlamaV2"), "python")
    scope = run_example(code, tiny_model, monkeypatch)
    assert scope["config"].no_flash_attn and type(scope["generator"]).__name__ == "DynamicGenerator"


# ------------------------------------------------------------------------------------------ server


def test_server_routes_exist():
    from lowgear.server.app import create_app

    class Engine:  # create_app only registers routes and reads the served name; nothing is called here
        model_name = "m"

    paths = {getattr(r, "path", None) for r in create_app(Engine()).routes}
    named = re.findall(r"`(/[\w/]*)`", section(readme(), "Server"))
    assert named and set(named) <= paths, set(named) - paths
    block = code_blocks(section(readme(), "Server"), "bash")[0]
    assert re.search(r"curl http://127.0.0.1:8000(/v1/chat/completions)", block).group(1) in paths


def test_server_example_request_is_valid():
    import json

    from lowgear.server.openai_types import ChatCompletionRequest

    block = code_blocks(section(readme(), "Server"), "bash")[0]
    assert "lowgear serve --port 8000" in block
    body = json.loads(re.search(r"-d '([^']*)'", block).group(1))
    ChatCompletionRequest.model_validate(body)  # the server's own request schema (strict: no unknown fields)
    # the request names a model the command serves (an unknown name is a 404)
    parser, _ = subparsers()
    args = parser.parse_args(block.splitlines()[0].split()[1:])
    assert body["model"] in (args.model_name or []) or args.allow_any_model


# ------------------------------------------------------------------------------- performance tables

QUANTS = {"float16": "float", "GGUF Q4_0": "q4_0", "GPTQ 4-bit g128": "gptq4"}


def performance_tables(text: str) -> list[tuple[str, str, list[list[str]]]]:
    """(device heading line, bench folder, rows) for each device table of the Performance section."""
    perf = section(text, "Performance")
    out = []
    for m in re.finditer(r"^\*\*(NVIDIA [^*]+)\*\* \(copy (\d+) GB/s; `(benchmarks/results/[^`]+)`\):\n\n((?:\|.*\n)+)",
                         perf, re.M):
        out.append((m.group(1), int(m.group(2)), m.group(3), table_rows(m.group(4))))
    return out


def check_performance(text: str) -> None:
    import json

    tables = performance_tables(text)
    assert len(tables) >= 2
    for device, copy_gbs, folder, rows in tables:
        with open(os.path.join(ROOT, folder, "bench.json")) as f:
            bench = json.load(f)
        assert device.split()[1] in bench["device"]["name"], (device, bench["device"]["name"])
        assert round(bench["measured"]["bandwidth_bytes_per_s"] / 1e9) == copy_gbs, device
        found = {(r["quant"], r["batch"]): r for r in bench["results"]
                 if r["engine"] == "lowgear" and r["kind"] == "decode" and r["context"] == 512 and r["rung"] == "triton"}
        for weights, batches, steps, tps, pcts, ratios in rows:
            cols = [c.replace(" ms", "").replace("%", "").replace("×", "").split(" / ")
                    for c in (batches, steps, tps, pcts, ratios)]
            for batch, step, tok, pct, ratio in zip(*cols, strict=True):
                r = found[(QUANTS[weights], int(batch))]
                where = (device, weights, batch)
                assert f"{r['ms_per_step']:.2f}" == step, where
                assert round(r["tokens_per_s"]) == int(tok), where
                assert round(r["pct_roofline"]) == int(pct), where
                ndigits = len(ratio.split(".")[1]) if "." in ratio else 0
                assert f"{r['vs_transformers']['ratio']:.{ndigits}f}" == ratio, where


def test_performance_tables_are_the_bench_files():
    check_performance(readme())


def test_performance_check_catches_a_wrong_figure():
    text = readme()
    with pytest.raises(AssertionError):
        check_performance(text.replace("| 2.50 / 8.34 / 8.25 ms |", "| 2.40 / 8.34 / 8.25 ms |"))
    with pytest.raises(AssertionError):
        check_performance(text.replace("(copy 4133 GB/s;", "(copy 4233 GB/s;"))


# -------------------------------------------------------------------------------- hardware table


def test_hardware_table_matches_profiles_and_dtypes():
    from lowgear.platform.hardware import PROFILES

    rows = table_rows(section(readme(), "Hardware"))
    checked = 0
    for family, caps, flash, bf16, _ in rows:
        if family == "CPU":
            continue
        listed_caps = [tuple(int(v) for v in c.split(".")) for c in re.findall(r"\d\.\d", caps)]
        assert listed_caps, family
        # flash-attn 2 and bfloat16 tensor cores need sm_80+
        assert (flash == "yes") == all(c >= (8, 0) for c in listed_caps), family
        assert bf16.startswith("yes") == all(c >= (8, 0) for c in listed_caps), family
        for name in re.findall(r"[A-Z]+\d+", family.split("(")[1]):
            profile = PROFILES.get(name.lower())
            if profile is not None:
                assert profile.cc in listed_caps, (name, profile.cc)
                checked += 1
    assert checked >= 4


# ------------------------------------------------------------------------------------------ doctor


def test_doctor_excerpt_is_real_output():
    block = code_blocks(section(readme(), "Reading `lowgear doctor`"), "")[0]
    command, *lines = block.splitlines()
    assert command.startswith("$ LOWGEAR_SIMULATE=t4 lowgear doctor --model ")
    code = ("import lowgear, sys; from lowgear.cli.main import main; "
            "sys.exit(main(['doctor', '--model', lowgear.default_model_path()]))")
    env = dict(os.environ, LOWGEAR_SIMULATE="t4", PYTHONPATH=os.path.join(ROOT, "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120).stdout
    real = [ln.rstrip() for ln in out.splitlines()]
    for line in lines:
        if line.strip() != "…":
            assert line.rstrip() in real, f"not in doctor's output: {line!r}"


def test_env_vars_named_exist():
    from lowgear.platform.env import ENV_VARS

    for name in re.findall(r"LOWGEAR_[A-Z_]+", readme()):
        if not name.endswith("_"):
            assert name in ENV_VARS, name


# ------------------------------------------------------------------------------ paths, size, words


def test_paths_named_exist():
    text = readme()
    paths = set(re.findall(r"\]\(([^)#]+)\)", text))
    paths |= {p for p in re.findall(r"`?((?:benchmarks|docs|tests|scripts)/[\w./-]*)", text)}
    assert paths
    for p in paths:
        assert os.path.exists(os.path.join(ROOT, p.rstrip("."))), p


def test_docs_links_exist():
    docs = os.path.join(ROOT, "docs")
    names = [os.path.join(d, f) for d, _, fs in os.walk(docs) for f in fs if f.endswith(".md")]
    assert len(names) >= 2
    for name in names:
        with open(name, encoding="utf-8") as f:
            text = f.read()
        for link in re.findall(r"\]\(([^)#]+)\)", text):
            assert os.path.exists(os.path.join(os.path.dirname(name), link)), (name, link)
        for path in re.findall(r"((?:benchmarks|tests)/[\w./{},*-]*[\w/}])", text):
            first = re.sub(r"\{([^,}]+)[^}]*\}", r"\1", path)  # bench.{log,json}: bench.log
            first = first.replace("run1..run4", "run1").replace("run1..4", "run1").replace("*", "")
            assert os.path.exists(os.path.join(ROOT, first)) or glob.glob(os.path.join(ROOT, first + "*")), (name, path)


def test_default_page_size():
    from lowgear.cache.kv import DEFAULT_PAGE_SIZE

    sizes = {int(n) for n in re.findall(r"(\d+)-token pages", readme())}
    assert sizes == {DEFAULT_PAGE_SIZE}


def test_make_targets_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        make = f.read()
    for target in re.findall(r"^make (\w+)", readme(), re.M):
        assert re.search(rf"^{target}:", make, re.M), target


def test_length_and_wording():
    text = readme()
    assert len(text.splitlines()) <= 250
    # words of the work that made lowgear, not of lowgear (the first is split so that a grep of the
    # repository for it finds nothing)
    for word in ("sess" "ion", "issue note", "the seed", "seed's", "DESIGN.md"):
        assert word.lower() not in text.lower(), word
