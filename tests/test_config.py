"""Config is the one place for switches and defaults: each one reaches what it switches, and its
environment variable is folded in there."""

from __future__ import annotations

import pytest

import lowgear as lg
from lowgear import defaults
from lowgear.errors import ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    return write_gguf(tmp_path_factory.mktemp("config") / "m.gguf", hidden_size=64, num_layers=1, num_heads=4)


def test_page_size_default_config_and_argument(tiny):
    config = lg.Config(tiny)
    model = lg.Model(config)
    assert lg.Cache(model, max_seq_len=512).page_size == defaults.PAGE_SIZE == 256
    config.page_size = 32
    assert lg.Cache(model, max_seq_len=512).page_size == 32
    assert lg.Cache(model, max_seq_len=512, page_size=16).page_size == 16  # the Cache's own argument wins


def test_cuda_graphs_switch_and_its_variable(tiny, monkeypatch):
    monkeypatch.delenv("LOWGEAR_NO_CUDA_GRAPHS", raising=False)
    config = lg.Config(tiny)
    assert not config.cuda_graphs_off()
    config.no_cuda_graphs = True
    assert config.cuda_graphs_off()
    config.no_cuda_graphs = False
    monkeypatch.setenv("LOWGEAR_NO_CUDA_GRAPHS", "1")
    assert config.cuda_graphs_off()


def test_pdl_switches_and_their_variables(monkeypatch):
    for name in ("LOWGEAR_NO_PDL", "LOWGEAR_PDL_RELEASE"):
        monkeypatch.delenv(name, raising=False)
    config = lg.Config()
    assert (config.pdl_off(), config.pdl_release_name()) == (False, "auto")
    monkeypatch.setenv("LOWGEAR_PDL_RELEASE", "LOOP")
    assert config.pdl_release_name() == "loop"
    config.pdl_release = "wait"  # the config's own setting wins over the variable
    assert config.pdl_release_name() == "wait"
    monkeypatch.setenv("LOWGEAR_NO_PDL", "yes")
    assert config.pdl_off()
    config.pdl_release = "never"
    with pytest.raises(ConfigError, match="'never'"):
        config.pdl_release_name()


def test_defaults_are_read_from_one_place():
    from lowgear.attention.select import LADDER
    from lowgear.config import BACKEND_NAMES
    from lowgear.engine.generator import DynamicGenerator
    import inspect

    assert LADDER is BACKEND_NAMES is defaults.ATTENTION_LADDER
    assert inspect.signature(DynamicGenerator).parameters["max_batch_size"].default == defaults.MAX_BATCH_SIZE
    assert lg.Config().max_input_len == defaults.MAX_INPUT_LEN
