"""CUDA-graph decode bookkeeping without a GPU: buckets, the padded staging buffer, and the switch
that keeps graphs off on the CPU (where the generator must behave exactly as before)."""

from __future__ import annotations

import pytest

import lowgear as lg
from lowgear.engine.graphs import DecodeRow, DecodeStaging, bucket_for, buckets_for


def test_buckets():
    assert buckets_for(1) == [1]
    assert buckets_for(16) == [1, 2, 4, 8, 16]
    assert buckets_for(12) == [1, 2, 4, 8, 12]
    assert buckets_for(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    b = buckets_for(12)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert bucket_for(13, b) is None


def test_staging_fill_real_and_padding_rows():
    ps, width, scratch = 16, 4, 9
    st = DecodeStaging(rows=8, width=width, page_size=ps)
    rows = [DecodeRow(token=5, kv_len=1, pages=[3]), DecodeRow(token=7, kv_len=33, pages=[4, 1, 6])]
    st.fill(rows, bucket=4, scratch_page=scratch)
    ids, pos, slots, kv, tables = (t.tolist() for t in st.sections(st.host))
    assert ids[:4] == [5, 7, 0, 0]
    assert pos[:4] == [0, 32, 0, 0]
    assert slots[:4] == [3 * ps, 6 * ps + 0, scratch * ps, scratch * ps]
    assert kv[:4] == [1, 33, 1, 1]
    assert tables[:4] == [[3, 0, 0, 0], [4, 1, 6, 0], [scratch, 0, 0, 0], [scratch, 0, 0, 0]]
    # A later, smaller step overwrites the rows it uses (stale rows past the bucket are never read).
    st.fill([DecodeRow(token=2, kv_len=17, pages=[8, 2])], bucket=1, scratch_page=scratch)
    ids, pos, slots, kv, tables = (t.tolist() for t in st.sections(st.host))
    assert (ids[0], pos[0], slots[0], kv[0], tables[0]) == (2, 16, 2 * ps, 17, [8, 2, 0, 0])


def test_staging_all_padding():
    st = DecodeStaging(rows=2, width=3, page_size=4)
    st.fill([], bucket=2, scratch_page=1)
    ids, pos, slots, kv, tables = (t.tolist() for t in st.sections(st.host))
    assert kv == [1, 1] and slots == [4, 4] and tables == [[1, 0, 0], [1, 0, 0]] and ids == [0, 0]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lowgear.bench.synthetic import write_gguf

    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_gguf(path, arch="llama", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
               intermediate_size=64, qtype="Q8_0", seed=1)
    return str(path)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_graphs_off_on_cpu(tiny_gguf, cuda_graphs):
    config = lg.Config(tiny_gguf)
    config.attn_backend = "eager"
    model = lg.Model(config)
    cache = lg.Cache(model, max_seq_len=256, page_size=16)
    model.load_autosplit(cache)
    gen = lg.DynamicGenerator(model=model, cache=cache, tokenizer=lg.Tokenizer(config), cuda_graphs=cuda_graphs)
    assert gen.graphs is None and gen.graphs_off_reason
    assert gen.pool.num_used == 0  # no scratch page taken


def test_env_switch_documented():
    from lowgear.platform import env

    assert "LOWGEAR_NO_CUDA_GRAPHS" in env.ENV_VARS
