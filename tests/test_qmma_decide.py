"""benchmarks/qmma_decide.py: which untimed qmma choice a GPU run's A/B and test log make the default."""

from __future__ import annotations

import shutil

from helpers import benchmark_module

D = benchmark_module("qmma_decide")
PASSED = "....\n154 passed in 98.12s (0:01:38)\n"


def row(quant, batch, tldot, dq, both, persist, equal=True):
    return {"quant": quant, "batch": batch, "median_ms": {"tldot": tldot, "dq": dq, "both": both, "persist": persist},
            "tokens_equal": equal}


# ms a step; at 32-64 rows dq is 0.80x / 0.75x tldot; at 4-16 rows both is 0.95x dq, persist 0.90x
SUMMARY = [row("q4_k", 4, 4.0, 4.0, 3.8, 3.6), row("q4_k", 16, 6.0, 6.0, 5.7, 5.4),
           row("q4_k", 32, 10.0, 8.0, 8.0, 8.0), row("q4_k", 64, 20.0, 15.0, 15.0, 15.0)]


def won(verdict):
    return {k for k, (w, _) in verdict.items() if w}


def test_all_three_win_when_faster_and_tested():
    assert won(D.decide(SUMMARY, PASSED)) == {"route", "split_major", "persistent"}


def test_a_failed_test_keeps_its_choice_off():
    log = "FAILED tests/test_qmma_gpu.py::test_persistent_grid[s1-g1-4-16-6144-4096-128] - AssertionError\n" \
          "1 failed, 153 passed in 99.0s\n"
    assert won(D.decide(SUMMARY, log)) == {"route", "split_major"}
    log = "FAILED tests/test_qmma_gpu.py::test_dq_matches_float64[auto-64-4096-4096] - AssertionError\n1 failed, 153 passed\n"
    assert won(D.decide(SUMMARY, log)) == {"split_major", "persistent"}


def test_tests_cut_short_decide_nothing():
    log = "....\n!!!!!!! KeyboardInterrupt !!!!!!!\n220 passed, 66 deselected in 164.25s\n"
    assert won(D.decide(SUMMARY, log)) == set()


def test_within_one_percent_or_different_tokens_is_no_win():
    s = [row("q4_k", 4, 4.0, 4.0, 3.98, 4.0), row("q4_k", 16, 6.0, 6.0, 5.97, 6.0),  # 0.5% and 0.5%: no
         row("q4_k", 32, 10.0, 8.0, 8.0, 8.0), row("q4_k", 64, 20.0, 15.0, 15.0, 15.0, equal=False)]
    assert won(D.decide(s, PASSED)) == set()
    # the persistent grid must beat the split-major sum alone too: 0.95x dq each -> the sum alone wins
    s = [row("q4_k", 4, 4.0, 4.0, 3.8, 3.8), row("q4_k", 16, 6.0, 6.0, 5.7, 5.7)]
    assert won(D.decide(s, PASSED)) == {"split_major"}


def test_apply_sets_only_the_winners_lines(tmp_path):
    path = tmp_path / "qmma.py"
    shutil.copy(D.QMMA, path)
    verdict = {"route": (True, ""), "split_major": (False, ""), "persistent": (False, "")}
    assert D.apply(verdict, str(path)) == ["ROUTE_MAX_M = 64"]
    text = path.read_text()
    assert "\nROUTE_MAX_M = 64\n" in text and "\nSPLIT_MAJOR_SUM = False\n" in text and "\nPERSISTENT = False\n" in text


def test_apply_stops_on_a_line_qmma_py_no_longer_has(tmp_path):
    path = tmp_path / "qmma.py"
    path.write_text("ROUTE_MAX_M = 32\n")
    try:
        D.apply({"route": (True, "")}, str(path))
    except SystemExit as e:
        assert "has no line 'ROUTE_MAX_M = 16'" in str(e)
    else:
        raise AssertionError("a missing line must stop the run")
    assert path.read_text() == "ROUTE_MAX_M = 32\n"  # nothing half-written


def test_no_ab_summary_decides_nothing(tmp_path, capsys, monkeypatch):
    (tmp_path / "qmma_tests.log").write_text(PASSED)
    monkeypatch.setattr("sys.argv", ["qmma_decide.py", str(tmp_path)])
    D.main()
    out = capsys.readouterr().out
    assert "nothing wins" in out and out.count("stays") == 3
