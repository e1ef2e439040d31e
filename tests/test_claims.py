"""The experiments' claims table (docs/experiments.md) is rendered from the checked-in digests
(docs/data/experiments/*.json) by tools/claims.py, and the digests come from real results.json
files: the extraction reads what the runner writes, and every verdict follows its figures."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from tests.support import REPO
from tokenscaler.experiments.suite import run_experiment
from tools import claims

# full length where it is cheap (the paper's scenarios run in seconds), shortened elsewhere:
# what is checked is that every figure a row reads exists in what the runner writes
RUNS = {
    "paper-overload": None, "paper-fairshare": None, "overload": 30.0, "fairshare": 30.0, "burst": 30.0,
    "long-prompt": 30.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {
        s: run_experiment(s, claims.policies_needed(s), seed=7, duration_s=dur, jobs=1) for s, dur in RUNS.items()
    }


def test_the_checked_in_table_is_what_the_checked_in_digests_give() -> None:
    assert (REPO / claims.PAGE).read_text(encoding="utf-8") == claims.render_page(REPO), (
        "docs/experiments.md's claims table drifted from docs/data/experiments/*.json: run python -m tools.claims"
    )
    assert claims.main(["--check"]) == 0


def test_every_checked_in_digest_has_exactly_the_figures_its_rows_read() -> None:
    for name, d in claims.load_digests().items():
        assert d["scenario"] == name
        assert set(d["figures"]) == {n for n, _ in claims.FIGURES[name]}, name
        assert d["command"] == claims.COMMAND.format(scenario=name)


def test_a_real_run_digests_into_the_same_figures_and_renders(results: dict[str, dict]) -> None:
    digests = {}
    for name, res in results.items():
        d = claims.digest(json.loads(json.dumps(res)), source="a test run")  # as read back from results.json
        assert list(d["figures"]) == [n for n, _ in claims.FIGURES[name]]
        digests[name] = d
    full = digests["paper-overload"]["figures"]
    assert all(v is not None for v in full.values()), full
    # the figure is the run's own number (rounded to 4 significant digits)
    g = results["paper-overload"]["policies"]["tokenpools"]["tiers"]["guaranteed"]
    assert full["tokenpools.guaranteed.ttft_p99_s"] == float(f"{g['ttft_p99_s']:.4g}")
    table = claims.render_table(digests)  # shortened runs leave some figures None: rendered as "-"
    assert table.count("\n| paper-overload |") == 4 + 1 and "a test run" in table  # four claims, its source


def test_a_results_json_without_a_figure_is_an_error_naming_it(results: dict[str, dict]) -> None:
    res = copy.deepcopy(results["burst"])
    del res["policies"]["tpm"]["tpm_overshoot"]
    with pytest.raises(ValueError, match=r"burst: figure tpm\.longctx\.overshoot_tokens"):
        claims.digest(res, source="x")


def test_verdicts_follow_the_figures() -> None:
    digests = claims.load_digests()
    rows = dict(claims.ROWS["overload"](claims.Figures(digests["overload"])))
    claim = "utilization >= 90% on the binding dimension"
    assert rows[claim].endswith(": holds")
    worse = copy.deepcopy(digests["overload"])
    worse["figures"]["tokenpools.utilization.throughput_tokens_per_s"] = 0.85
    rows = dict(claims.ROWS["overload"](claims.Figures(worse)))
    assert rows[claim] == "throughput 85% while spot is offered: **does not hold**"


def test_digesting_a_run_writes_its_digest_and_rerenders_the_table(tmp_path: Path, results: dict[str, dict]) -> None:
    for rel in [claims.PAGE, *(claims.DIGESTS / f"{s}.json" for s in claims.SCENARIOS)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, tmp_path / rel)
    run = tmp_path / "runs" / "paper-fairshare"
    run.mkdir(parents=True)
    res = copy.deepcopy(results["paper-fairshare"])
    res["policies"]["tokenpools"]["jain_index_over_time"][-1][1] = 0.5  # a different run
    (run / "results.json").write_text(json.dumps(res))
    assert claims.main([str(run), "--source", "a run for this test", "--repo", str(tmp_path)]) == 0
    d = json.loads((tmp_path / claims.DIGESTS / "paper-fairshare.json").read_text())
    assert d["source"] == "a run for this test" and d["figures"]["tokenpools.jain"] == 0.5
    page = (tmp_path / claims.PAGE).read_text()
    assert "Jain 0.5000" in page and "| paper-fairshare | 7 | 300 | a run for this test |" in page
    assert claims.main(["--check", "--repo", str(tmp_path)]) == 0
    assert claims.main(["--check", "--repo", str(REPO)]) == 0  # the checkout is untouched
