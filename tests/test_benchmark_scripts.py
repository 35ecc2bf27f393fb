"""The learning-efficiency and ablation benchmarks: end to end in their smoke mode (tiny model), so that they cannot
rot (tables, row counts, the job cache, JSON and plots); the pairing of seeds across algorithms in the trainer; and
the statistics of benchmarks/power.py on closed forms and synthetic data with a known answer."""

import json
import math
import os
import random
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import ablations  # noqa: E402
import learning_efficiency  # noqa: E402
import power  # noqa: E402

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


# ---------------------------------------------------------------------------------------------- end to end


def test_learning_efficiency_smoke_sweeps_reports_and_caches(tmp_path, monkeypatch):
    arms = [label for label, fields in learning_efficiency.ARMS if not learning_efficiency.unavailable_reason(fields)]
    argv = ["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path)]
    learning_efficiency.main(argv)
    report = (tmp_path / "learning_efficiency_smoke.md").read_text()
    sweep = table_rows(report, "| arm | lr 0.0005 |")
    assert [row[0] for row in sweep] == arms
    rows = table_rows(report, "| arm | lr | seeds |")
    assert [row[0] for row in rows] == arms
    by_arm = {row[0]: row for row in rows}
    # E-GRPO per iteration: T + G * sum(T - k - l) sampling rows and one update row per merged step; Flow-GRPO
    # samples G full trajectories.
    assert int(by_arm["e-grpo"][3].replace(",", "")) == PROMPTS * (T + G * sum(T - end for end in PAPER_PLAN_ENDS))
    assert int(by_arm["e-grpo"][4]) == PROMPTS * 8
    assert int(by_arm["flow-grpo"][3]) == PROMPTS * G * T
    assert all(row[2] == "2" and row[5] == "2" for row in rows)  # two report seeds, two iterations each
    assert "## E-GRPO / best baseline" in report and "## Per-iteration ordering: gain at iteration 2" in report
    assert "Stability: the lowest validation gain" in report
    comparisons = table_rows(report, "| arm | reference |")
    assert [(row[0], row[1]) for row in comparisons] == learning_efficiency.PAIRED_COMPARISONS
    assert all(row[-1] == "2" for row in comparisons)  # paired over the two report seeds

    results = json.loads((tmp_path / "learning_efficiency_smoke.json").read_text())
    assert set(results["learning_rates"]) == set(arms)
    assert all(lr in (5e-4, 1e-3) for lr in results["learning_rates"].values())
    cache = tmp_path / "cache" / "learning_efficiency_smoke_tiny"
    runs = [json.loads(path.read_text()) for path in cache.glob("*.json")]
    assert len(runs) == len(arms) * (2 + 2)  # 2 learning rates x 1 sweep seed, 2 report seeds
    for run in runs:
        assert [point["iteration"] for point in run["points"]] == [0, 2]
        # A KL term (Flow-GRPO: beta 0.01 by default, DiffusionNFT: 1e-4) forwards the frozen base once per update row.
        reference = 1 if run["arm"] in ("flow-grpo", "diffusion-nft") else 0
        for point in run["points"]:
            assert point["reference_rows"] == reference * point["update_rows"]
            assert point["total"] == point["sampling_rows"] + 3 * point["update_rows"] + point["reference_rows"]
    assert (tmp_path / "learning_efficiency_smoke.png").read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "learning_efficiency_smoke_seeds.png").read_bytes()[:8] == PNG_MAGIC

    # A second call trains nothing; --seeds 3 trains exactly the new seed of the arms asked for.
    trained = []
    run_curve = learning_efficiency.run_curve

    def counting_run_curve(backend, job, mode):
        trained.append(job)
        return run_curve(backend, job, mode)

    monkeypatch.setattr(learning_efficiency, "run_curve", counting_run_curve)
    learning_efficiency.main(argv)
    assert trained == []
    learning_efficiency.main([*argv, "--seeds", "3", "--arms", "e-grpo,flow-grpo"])
    assert sorted((job.arm, job.seed) for job in trained) == [("e-grpo", 2), ("flow-grpo", 2)]
    report = (tmp_path / "learning_efficiency_smoke.md").read_text()
    # The report covers every cached arm, not only those the call trained.
    seeds = {row[0]: row[2] for row in table_rows(report, "| arm | lr | seeds |")}
    assert seeds == {arm: "3" if arm in ("e-grpo", "flow-grpo") else "2" for arm in arms}

    # --learning_rates replaces the sweep grid: only the new rate's sweep run trains, the report's table shows it.
    trained.clear()
    learning_efficiency.main([*argv, "--arms", "awm", "--learning_rates", "2e-3", "--phase", "sweep"])
    assert [(job.arm, job.learning_rate, job.split) for job in trained] == [("awm", 2e-3, "validation")]
    sweep = {row[0]: row for row in table_rows((tmp_path / "learning_efficiency_smoke.md").read_text(), "| arm |")}
    assert set(sweep) == set(arms) and all(len(row) == 5 for row in sweep.values())  # lr 5e-4, 1e-3, 2e-3, chosen
    assert sweep["e-grpo"][3] == "-" and sweep["awm"][3] != "-"  # only awm was swept at 2e-3


def test_learning_efficiency_names_an_unavailable_arm(capsys):
    kept = learning_efficiency.available_arms([("e-grpo", {}), ("future", dict(no_such_field=1))])
    assert kept == [("e-grpo", {})]
    assert "arm 'future' is unavailable and left out: EGRPOConfig has no field no_such_field" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Unknown arm"):
        learning_efficiency.available_arms(learning_efficiency.ARMS, ["no such arm"])


def test_ablations_smoke_lays_out_the_tables_and_verdicts(tmp_path):
    ablations.main(["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path)])
    report = (tmp_path / "ablations_smoke.md").read_text()
    sections = report.split("\n## ")[1:]
    assert [section.splitlines()[0] for section in sections] == ["The paper's orderings", *ablations.TABLES]
    claims = table_rows(report, "| claim |")
    assert [row[0] for row in claims if row[0]] == list(ablations.CLAIMS)
    assert all(row[7] in ("confirmed", "refuted", "unresolved") for row in claims if row[0])
    tables = {section.splitlines()[0]: table_rows("## " + section, "| setting |") for section in sections[1:]}
    plans = {row[0]: row[1] for rows in tables.values() for row in rows}
    assert plans[ablations.PAPER] == PAPER_PLAN
    assert plans["no merging"] == " ".join(f"({k},1)" for k in range(8))
    assert plans["fixed 4"] == " ".join(f"({k},4)" for k in range(8))
    assert plans["first 4"] == "(0,1) (1,1) (2,2) (3,2)"
    assert plans["second 8"].startswith("(8,") and len(plans["second 8"].split()) == 8
    assert len(plans["all 16"].split()) == 16 and plans["all 16"].startswith(PAPER_PLAN)
    # The paper's setting is in every table but trained once per seed.
    cache = tmp_path / "cache" / "ablations_smoke_tiny"
    assert len(list(cache.glob("*.json"))) == len(plans) * 2
    assert (
        json.loads((tmp_path / "ablations_smoke.json").read_text())["learning_rate"] == ablations.DEFAULT_LEARNING_RATE
    )
    assert (tmp_path / "ablations_smoke.png").read_bytes()[:8] == PNG_MAGIC


DPM_BASE = "e-grpo dpm++2m 0.4"


def test_ablations_on_another_base_layer_the_settings_on_its_fields(tmp_path):
    (tmp_path / "learning_efficiency_smoke.json").write_text(json.dumps(dict(learning_rates={DPM_BASE: 7e-4})))
    reference = ablations.reference_label(DPM_BASE)
    argv = ["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path), "--base", DPM_BASE]
    ablations.main([*argv, "--arms", f"{reference},tau 2.6"])
    report = (tmp_path / "ablations_smoke_e-grpo_dpm++2m_0.4.md").read_text()
    assert f"Base arm: `{DPM_BASE}` (algorithm=e-grpo, completion_solver=dpmpp_2m" in report
    assert "Left out: 'DPM++ 2M, 40% of steps'" in report  # the base itself: it would be the reference run twice
    tau_table = next(section for section in report.split("\n## ") if section.startswith("Entropy threshold"))
    rows = {row[0]: row for row in table_rows(tau_table, "| setting |")}
    assert list(rows) == [reference, "tau 2.6"] and rows[reference][6] == "-" and rows["tau 2.6"][6] != "-"
    assert not (tmp_path / "ablations_smoke.md").exists()  # the paper's ablations' names stay theirs
    results = json.loads((tmp_path / "ablations_smoke_e-grpo_dpm++2m_0.4.json").read_text())
    assert (results["base"], results["left_out"], results["learning_rate"]) == (
        DPM_BASE,
        ["DPM++ 2M, 40% of steps"],
        7e-4,
    )
    runs = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("*/*.json")]
    assert {path.name for path in (tmp_path / "cache").iterdir()} == {"ablations_smoke_tiny_e-grpo_dpm++2m_0.4"}
    assert sorted((run["arm"], run["seed"]) for run in runs) == [
        (reference, 0),
        (reference, 1),
        ("tau 2.6", 0),
        ("tau 2.6", 1),
    ]
    for run in runs:
        assert run["fields"]["completion_solver"] == "dpmpp_2m" and run["fields"]["completion_steps_fraction"] == 0.4
        assert run["fields"].get("entropy_threshold") == (2.6 if run["arm"] == "tau 2.6" else None)
        assert run["learning_rate"] == 7e-4


def test_ablations_refuse_a_base_they_cannot_layer_on(tmp_path, capsys):
    argv = ["--smoke", "--model", "tiny", "--out", str(tmp_path)]
    for base in ("no such arm", "flow-grpo", "e-grpo dpm++2m 0.2 cps tau 3.5"):  # the last sets tau
        with pytest.raises(SystemExit, match=r"choose among \['e-grpo', 'e-grpo dpm\+\+2m 0.4'"):
            ablations.main([*argv, "--base", base])
    with pytest.raises(SystemExit, match="--iterations 0: give a positive number"):
        ablations.main([*argv, "--iterations", "0"])
    with pytest.raises(SystemExit):
        ablations.main(["--help"])
    usage = capsys.readouterr().out
    assert "--base LABEL" in usage and "--iterations N" in usage
    assert list(tmp_path.iterdir()) == []  # refused before anything ran


def test_ablations_default_base_keeps_the_papers_settings_and_names():
    """The default base runs exactly the jobs it ran before --base existed, so their cache keys stay valid."""
    settings, left_out = ablations.settings_on(ablations.DEFAULT_BASE)
    assert settings == [(label, dict(algorithm="e-grpo", **fields)) for label, fields in ablations.SETTINGS.items()]
    assert left_out == []
    assert ablations.reference_label(ablations.DEFAULT_BASE) == ablations.PAPER
    assert ablations.file_suffix(ablations.DEFAULT_BASE) == ""
    assert ablations.mode_with("full", None) is ablations.MODES["full"]


def test_ablations_iterations_replace_the_modes_and_key_the_cache(tmp_path, monkeypatch):
    argv = ["--smoke", "--model", "tiny", "--workers", "1", "--out", str(tmp_path), "--arms", "tau 2.6", "--seeds", "1"]
    ablations.main([*argv, "--iterations", "3"])
    path = tmp_path / "cache" / "ablations_smoke_tiny" / "tau_2.6__lr0.000125__report__s0.json"
    assert [point["iteration"] for point in json.loads(path.read_text())["points"]] == [0, 3]
    # The mode's 2 iterations are another run: the 3-iteration one in the cache is not reused for it.
    ablations.main(argv)
    assert [point["iteration"] for point in json.loads(path.read_text())["points"]] == [0, 2]


def test_a_seed_gives_every_algorithm_the_same_prompts_and_random_streams(tmp_path):
    """Paired seeds: with the same config.seed, every algorithm draws the same prompts at every iteration and
    consumes its rollout generator identically (one per-prompt seed per prompt), so the per-prompt random streams
    agree iteration after iteration."""
    from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
    from trl_flow_egrpo.rewards import ColorReward
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    backend = learning_efficiency.tiny_backend(1)
    prompts = ["p0", "p1", "p2", "p3", "p4"]
    states, rows = {}, {}
    for algorithm in ("e-grpo", "flow-grpo", "dance-grpo", "mix-grpo"):
        config = EGRPOConfig(
            output_dir=str(tmp_path / algorithm),
            algorithm=algorithm,
            seed=7,
            num_generations=2,
            prompts_per_device=2,
            save_steps=0,
            disable_tqdm=True,
            mixed_precision="no",
            **backend.config_fields,
        )
        trainer = EGRPOTrainer(config, build_tiny_flux_pipeline(seed=0), [ColorReward()], prompts)
        rows[algorithm] = [trainer.iteration_rows(i) for i in range(4)]
        trainer.step()
        states[algorithm] = trainer.generator.get_state()
    assert all(value == rows["e-grpo"] for value in rows.values())
    assert len({tuple(row["prompt"] for row in rows["e-grpo"][i]) for i in range(4)}) > 1  # the order does vary
    assert all(torch.equal(state, states["e-grpo"]) for state in states.values())


# ---------------------------------------------------------------------------------------------- statistics


def test_first_reach_interpolates_between_evaluations():
    assert power.first_reach([0, 10, 20], [0.0, 1.0, 2.0], 1.5) == pytest.approx(15)
    assert power.first_reach([0, 10, 20], [0.5, 0.2, 0.4], 0.5) == 0
    assert power.first_reach([0, 10, 20], [0.0, 1.0, 0.9], 1.2) == math.inf
    # The first crossing counts, not a later one.
    assert power.first_reach([0, 10, 20, 30], [0.0, 2.0, 0.0, 2.0], 1.0) == pytest.approx(5)


def _linear_run(seed: int, slope: float, points: int = 11, step: float = 1000.0, start: float = 0.7) -> dict:
    return dict(
        seed=seed,
        points=[dict(iteration=i, total=i * step, reward=start + slope * i * step) for i in range(points)],
        sampling_rows_per_iteration=step,
        update_rows_per_iteration=0.0,
        seconds=1.0,
    )


def test_rows_to_reach_uses_the_seed_mean_gain_curve():
    # Starts differ (0.7, 0.5): gains remove them. Slopes 1e-5 and 3e-5: the mean gain reaches 0.02 at 1,000.
    runs = [_linear_run(0, 1e-5, start=0.7), _linear_run(1, 3e-5, start=0.5)]
    assert power.rows_to_reach(runs, 0.02) == pytest.approx(1000)
    assert power.rows_to_reach(runs, 0.02, "iteration") == pytest.approx(1)
    assert power.rows_to_reach(runs, 1.0) == math.inf


def test_ratio_of_infinite_reaches():
    assert power.ratio(2.0, 4.0) == 0.5
    assert power.ratio(math.inf, 4.0) == math.inf
    assert power.ratio(2.0, math.inf) == 0.0
    assert math.isnan(power.ratio(math.inf, math.inf))
    # 100 values (the NaN is dropped), the top 5 infinite: the 2.5% and 97.5% order statistics are 2 and inf.
    values = [float(i) for i in range(95)] + [math.inf] * 5 + [math.nan]
    assert power.order_statistic_interval(values) == (2.0, math.inf)


def test_paired_resampling_keeps_seeds_together():
    # b's seeds differ widely, a = b + 0.01 seed by seed: the paired difference is exactly 0.01 in every resample,
    # while the spread of b alone is large.
    spread = [random.Random(s).gauss(0, 0.05) for s in range(10)]
    runs_b = [dict(seed=s, points=[dict(reward=0.7), dict(reward=0.7 + spread[s])]) for s in range(10)]
    runs_a = [dict(seed=s, points=[dict(reward=0.7), dict(reward=0.71 + spread[s])]) for s in range(10)]
    result = power.paired_difference(list(reversed(runs_a)), runs_b, num_resamples=200)
    assert result["estimate"] == pytest.approx(0.01) and result["seeds"] == 10
    assert result["low"] == pytest.approx(0.01) and result["high"] == pytest.approx(0.01)
    assert result["se"] == pytest.approx(0.0, abs=1e-12)
    assert power.verdict(result) == "confirmed"
    # Only common seeds pair up.
    assert power.paired_seeds({"a": runs_a[:6], "b": runs_b[3:]}) == [3, 4, 5]
    resamples = power.paired_resamples(5, 3, seed=1)
    assert len(resamples) == 3 and all(len(r) == 5 and all(0 <= i < 5 for i in r) for r in resamples)


def test_bootstrap_interval_covers_a_known_ratio():
    """Synthetic experiments with a known ratio of rows to reach: arm a's gain grows at slope 1e-5 per row
    (reaching 0.02 at 2,000 rows), arm b's at 4e-6 (at 5,000), each seed's slope off by a normal 20%. The true
    ratio is 0.4. The paired 95% percentile intervals of 60 experiments of 20 seeds cover it in 54 (0.90, the same
    in .venv and .venv-min; the percentile bootstrap under-covers a little at 20 seeds): at least 48 must."""
    covered = 0
    experiments = 60
    for experiment in range(experiments):
        generator = random.Random(experiment)
        runs = {
            "a": [_linear_run(s, 1e-5 * (1 + 0.2 * generator.gauss(0, 1))) for s in range(20)],
            "b": [_linear_run(s, 4e-6 * (1 + 0.2 * generator.gauss(0, 1))) for s in range(20)],
        }
        statistic = power.reach_ratio_statistic("a", "b", 0.02)
        result = power.paired_bootstrap(runs, statistic, num_resamples=200, seed=experiment)
        covered += result["low"] <= 0.4 <= result["high"]
        assert 0 < result["low"] <= result["estimate"] <= result["high"] < 1
    assert covered >= 48


def test_best_baseline_ratio_takes_the_fastest_baseline():
    runs = {
        "e-grpo": [_linear_run(s, 2e-5) for s in range(3)],  # reaches 0.02 at 1,000
        "slow": [_linear_run(s, 2e-6) for s in range(3)],  # at 10,000
        "fast": [_linear_run(s, 5e-6) for s in range(3)],  # at 4,000
    }
    statistic = learning_efficiency.best_baseline_ratio("e-grpo", ["slow", "fast"], 0.02)
    assert statistic(runs) == pytest.approx(0.25)
    summary = learning_efficiency.summarize(runs, num_resamples=50)
    assert summary["ratios"]["e-grpo"]["total"]["estimate"] == pytest.approx(0.25)
    # Final gains 0.2, 0.02 and 0.05: the lead is over the baseline with the largest one.
    assert summary["ratios"]["e-grpo"]["final_gain_lead"]["estimate"] == pytest.approx(0.15)
    assert summary["rows"]["fast"]["rows_to_reach"] == pytest.approx(4000)
    assert summary["ordering"]["iteration"] == 10
    assert summary["ordering"]["arms"]["fast"]["difference_to_e_grpo"]["estimate"] == pytest.approx(-0.15)


def test_verdicts_and_seed_counts():
    assert power.verdict(dict(low=0.001, high=0.02)) == "confirmed"
    assert power.verdict(dict(low=-0.02, high=-0.001)) == "refuted"
    assert power.verdict(dict(low=-0.01, high=0.01)) == "unresolved"
    assert power.verdict(dict(low=0.001, high=0.02, seeds=power.MIN_SEEDS_FOR_VERDICT - 1)) == "unresolved"
    assert power.chain_verdict(["confirmed", "confirmed"]) == "confirmed"
    assert power.chain_verdict(["confirmed", "unresolved"]) == "unresolved"
    assert power.chain_verdict(["confirmed", "refuted"]) == "refuted"
    # 2 s.e. = 0.01 with a paired sd of 0.03: (2 * 0.03 / 0.01)^2 = 36 seeds.
    assert power.seeds_to_resolve(0.03) == 36
    assert power.seeds_to_resolve(0.0217) == 19


def test_ablation_claims_get_verdicts_from_paired_intervals():
    gains = {ablations.PAPER: 0.05, "fixed 2": 0.03, "fixed 4": 0.03, "fixed 6": 0.03, "no merging": 0.01}
    gains |= {"all 16": 0.05, "second 8": 0.06}  # the paper's claim first 8 > all > second 8 fails both ways
    runs = {
        label: [
            dict(
                seed=s,
                points=[dict(iteration=0, reward=0.7), dict(iteration=5, reward=0.7 + gain + 0.002 * (s % 3))],
                merge_plan=[(0, 1)],
                sampling_rows_per_iteration=1.0,
                update_rows_per_iteration=1.0,
                seconds=1.0,
            )
            for s in range(10)
        ]
        for label, gain in gains.items()
    }
    summary = ablations.summarize(runs, num_resamples=100)
    assert summary["claims"]["adaptive > fixed merges > none"]["verdict"] == "confirmed"
    assert summary["claims"]["first 8 > all > second 8"]["verdict"] == "refuted"
    assert "tau 2.2 best" not in summary["claims"]  # its settings did not run
    assert summary["against_reference"]["fixed 2"]["estimate"] == pytest.approx(-0.02)
    assert summary["against_reference"]["fixed 2"]["resolves"]


def test_sweep_picks_the_learning_rate_with_the_largest_mean_gain():
    def run(arm, lr, seed, gains):
        return dict(arm=arm, learning_rate=lr, seed=seed, points=[dict(reward=0.5 + g) for g in [0.0, *gains]])

    sweep = [run("a", 1e-3, 0, [0.01, 0.0]), run("a", 1e-3, 1, [-0.03, 0.03]), run("a", 5e-4, 0, [0.01, 0.01])]
    choice = learning_efficiency.choose_learning_rates(sweep)["a"]
    assert choice["best"] == 5e-4
    assert choice["scores"][1e-3]["mean"] == pytest.approx(0.0025) and choice["scores"][1e-3]["seeds"] == 2
    # The lowest gain of any seed at any evaluation: the dip of seed 1, not a mean.
    assert choice["scores"][1e-3]["lowest"] == pytest.approx(-0.03) and choice["scores"][5e-4]["lowest"] == 0.0


def test_validation_and_report_prompts_share_no_composition():
    testbed = learning_efficiency.import_testbed(REPO)
    splits = learning_efficiency.split_heldout(testbed.heldout_prompts(), 48)
    assert all(len(prompts) == 48 for prompts in splits.values())

    def composition(prompt):
        return frozenset(prompt.split(" and "))

    validation = {composition(p) for p in splits["validation"]}
    assert not validation & {composition(p) for p in splits["report"]}
    assert not set(splits["validation"] + splits["report"]) & set(testbed.train_prompts())
    with pytest.raises(ValueError, match="evaluation prompts asked"):
        learning_efficiency.split_heldout(testbed.heldout_prompts(), 1000)
