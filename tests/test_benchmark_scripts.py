"""The learning-efficiency and ablation benchmarks end to end in their smoke mode (tiny model, 1 seed), so that
they cannot rot: their tables, row counts, JSON and plots; and the reach/ratio arithmetic on known curves."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import ablations  # noqa: E402
import learning_efficiency  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T = 16
G, PROMPTS = 2, 1  # the smoke mode's groups
# exp(h) of the 16-step shift-3 schedule at a = 0.7 gives the tau = 2.2 plan of METHOD.md section 3.
PAPER_PLAN = "(0,1) (1,1) (2,2) (3,2) (4,2) (5,3) (6,3) (7,3)"
PAPER_PLAN_ENDS = [1, 2, 4, 5, 6, 8, 9, 10]


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The cells of the rows of the first table whose header starts with ``header_start``."""
    lines = markdown.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_learning_efficiency_smoke_counts_rows_of_every_algorithm(tmp_path):
    summary = learning_efficiency.main(["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path)])
    report = (tmp_path / "learning_efficiency_smoke.md").read_text()
    rows = table_rows(report, "| algorithm |")
    assert [row[0] for row in rows] == ["e-grpo", "flow-grpo", "dance-grpo", "mix-grpo"]
    assert all(len(row) == 7 for row in rows)
    # Per iteration: E-GRPO T + G * sum(T - k - l) sampling rows and one update row per merged step;
    # trajectories G * T sampling rows and G * (trained steps) update rows (0.99 T, 0.6 T, a 4-step window).
    sampling = {
        "e-grpo": T + G * sum(T - end for end in PAPER_PLAN_ENDS),
        "flow-grpo": G * T,
        "dance-grpo": G * T,
        "mix-grpo": G * T,
    }
    updates = {"e-grpo": 8, "flow-grpo": G * 15, "dance-grpo": G * 9, "mix-grpo": G * 4}
    for row in rows:
        assert int(row[1].replace(",", "")) == PROMPTS * sampling[row[0]], row
        assert int(row[2].replace(",", "")) == PROMPTS * updates[row[0]], row
        assert row[3] == "2"
    assert summary["best_baseline"] in ("flow-grpo", "dance-grpo", "mix-grpo")
    assert "Target: the best baseline's final evaluation reward" in report

    results = json.loads((tmp_path / "learning_efficiency_smoke.json").read_text())
    assert len(results["runs"]) == 4
    for run in results["runs"]:
        points = run["points"]
        assert [point["iteration"] for point in points] == [0, 2]
        assert all(point["total"] == point["sampling_rows"] + 3 * point["update_rows"] for point in points)
    assert (tmp_path / "learning_efficiency_smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_ablations_smoke_lays_out_the_papers_tables(tmp_path):
    ablations.main(["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path)])
    report = (tmp_path / "ablations_smoke.md").read_text()
    sections = report.split("\n## ")[1:]
    assert [section.splitlines()[0] for section in sections] == list(ablations.ABLATIONS)
    tau, fixed, active = (table_rows("## " + section, "| setting |") for section in sections)
    assert [row[0] for row in tau] == ["tau = 0 (no merging)", "tau = 1.8", "tau = 2.0", ablations.PAPER, "tau = 2.6"]
    assert [row[0] for row in fixed] == ["fixed l = 2", "fixed l = 4", "fixed l = 6", ablations.PAPER]
    assert [row[0] for row in active] == ["first 4", ablations.PAPER, "second 8", "all 16"]
    plans = {row[0]: row[1] for row in tau + fixed + active}
    assert plans[ablations.PAPER] == PAPER_PLAN
    assert plans["tau = 0 (no merging)"] == " ".join(f"({k},1)" for k in range(8))
    assert plans["fixed l = 4"] == " ".join(f"({k},4)" for k in range(8))
    assert plans["first 4"] == "(0,1) (1,1) (2,2) (3,2)"
    assert plans["second 8"].startswith("(8,") and len(plans["second 8"].split()) == 8
    assert len(plans["all 16"].split()) == 16 and plans["all 16"].startswith(PAPER_PLAN)
    # The paper's setting is in all three tables but trained once: 11 distinct settings.
    results = json.loads((tmp_path / "ablations_smoke.json").read_text())
    assert len(results["runs"]) == 11
    assert (tmp_path / "ablations_smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_cost_to_reach_interpolates_between_evaluations():
    assert learning_efficiency.cost_to_reach([0, 10, 20], [0.0, 1.0, 2.0], 1.5) == pytest.approx(15)
    assert learning_efficiency.cost_to_reach([0, 10, 20], [0.5, 0.2, 0.4], 0.5) == 0
    assert learning_efficiency.cost_to_reach([0, 10, 20], [0.0, 1.0, 0.9], 1.2) is None


def _runs(totals, rewards_by_seed):
    return [
        dict(
            points=[
                dict(total=t, sampling_rows=t, update_rows=0, iteration=i, reward=r)
                for i, (t, r) in enumerate(zip(totals, rewards, strict=True))
            ],
            sampling_rows_per_iteration=1.0,
            update_rows_per_iteration=0.0,
            seconds=1.0,
        )
        for rewards in rewards_by_seed
    ]


def test_summary_targets_the_best_baseline_and_gives_egrpo_ratio():
    totals = [0, 100, 200, 300, 400]
    results = {
        "e-grpo": _runs(totals, [[0.0, 0.5, 0.9, 0.9, 1.0], [0.0, 0.3, 0.7, 0.9, 1.0]]),  # mean 0.4, 0.8: 0.6 at 150
        "flow-grpo": _runs(totals, [[0.0, 0.1, 0.2, 0.4, 0.6], [0.0, 0.1, 0.2, 0.4, 0.6]]),  # 0.6 at 400
        "dance-grpo": _runs(totals, [[0.0, 0.1, 0.1, 0.2, 0.3]] * 2),
    }
    summary = learning_efficiency.summarize(results)
    assert summary["best_baseline"] == "flow-grpo" and summary["target"] == pytest.approx(0.6)
    assert summary["rows"]["e-grpo"]["total_to_reach"] == pytest.approx(150)
    assert summary["rows"]["flow-grpo"]["total_to_reach"] == pytest.approx(400)
    assert summary["rows"]["dance-grpo"]["total_to_reach"] is None
    assert summary["egrpo_ratio"] == pytest.approx(150 / 400)
    assert summary["rows"]["e-grpo"]["final_se"] == pytest.approx(0.0)


def test_summary_gives_no_ratio_when_no_baseline_improved():
    totals = [0, 100, 200]
    results = {"e-grpo": _runs(totals, [[0.8, 0.7, 0.6]] * 2), "flow-grpo": _runs(totals, [[0.8, 0.75, 0.7]] * 2)}
    summary = learning_efficiency.summarize(results)
    assert summary["target_not_above_start"] and summary["egrpo_ratio"] is None
