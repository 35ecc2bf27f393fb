"""The benchmark scripts: the GPU probe's tiny CPU mode end to end, and the meta-device memory model."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
sys.path.insert(0, BENCHMARKS)

import memory  # noqa: E402

GIB = 2**30


def run_script(*args, timeout=600):
    """Run a benchmark script in a subprocess (one thread, offline); return its stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_gpu_probe_tiny_cpu_writes_results_and_row(tmp_path):
    stdout = run_script("benchmarks/gpu_probe.py", "--tiny", "--device", "cpu", "--out", str(tmp_path))
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    sections = [line["section"] for line in lines]
    for section in (
        "device",
        "build",
        "flops",
        "forward",
        "trainer_step",
        "lora_forward",
        "update",
        "update_phase",
        "sdpa",
        "vae_decode",
        "forward_compiled",
        "done",
    ):
        assert section in sections, f"section {section} missing from the probe's output: {sections}"

    (results_file,) = tmp_path.glob("*-cpu.json")
    results = json.loads(results_file.read_text())
    for key in (
        "device",
        "commit",
        "rollout_mfu",
        "iteration_seconds",
        "peak_reserved_gib",
        "on_policy_max_abs_dev",
        "details",
    ):
        assert key in results
    assert results["device"] == "cpu" and results["commit"]
    assert results["iteration_seconds"] > 0
    assert math.isfinite(results["on_policy_max_abs_dev"]) and results["on_policy_max_abs_dev"] >= 0
    assert results["rollout_mfu"] is None and results["peak_reserved_gib"] is None  # no GPU, no peak: null
    details = results["details"]
    assert details["flops"]["per_row"] > 0
    assert [entry["rows"] for entry in details["forward"]] == [1, 2]
    assert all(entry["s_per_call"] > 0 for entry in details["forward"])
    step = details["trainer_step"]
    assert step["trajectory_evaluations"] > 0 and step["sampling_s"] > 0 and step["config"]["num_generations"] == 2
    assert step["transformer_rows"] == step["trajectory_evaluations"]  # FLUX.1-dev: no classifier-free guidance
    phase = details["update_phase"]
    assert phase["clip_and_step_s"] > 0 and phase["forward_backward_s"] > 0 and phase["trainable_parameters"] > 0
    assert phase["ratio"] == pytest.approx(1 + phase["clip_and_step_s"] / phase["forward_backward_s"], abs=2e-3)
    assert {entry["gradient_checkpointing"] for entry in details["update"]} == {True, False}

    table = (tmp_path / "RESULTS.md").read_text().splitlines()
    assert table[0] == "# GPU probe results"
    assert table[-1].startswith("| ") and table[-1].endswith(f"| {results_file.name} |")
    assert f"| {results['commit']} |" in table[-1]


def test_gpu_probe_refuses_full_size_on_cpu():
    import gpu_probe

    with pytest.raises(SystemExit, match="--tiny"):
        gpu_probe.main(["--device", "cpu"])


@pytest.mark.slow
def test_full_size_probe_pipeline_fits_together_on_meta():
    """The GPU path's pipeline (real T5-XXL, CLIP-L, VAE, 12B transformer) encodes, denoises and decodes at
    720x720 with 512 tokens, checked on the meta device; its models are the memory model's."""
    from gpu_iteration import flux_dev_shaped_pipeline

    pipeline = flux_dev_shaped_pipeline("meta", torch.bfloat16)
    for module, name in (
        (pipeline.transformer, "transformer"),
        (pipeline.text_encoder_2, "t5_xxl"),
        (pipeline.text_encoder, "clip_l_text"),
        (pipeline.vae, "vae"),
    ):
        assert memory.parameter_count(module) == memory.parameter_count(memory.build_on_meta(name)), name
    embeds, pooled, _ = pipeline.encode_prompt(["a red apple on a table"], None, device="meta", max_sequence_length=512)
    inputs = memory.transformer_inputs(1, 720, 512) | dict(encoder_hidden_states=embeds, pooled_projections=pooled)
    with torch.no_grad():
        velocity = pipeline.transformer(**inputs)[0]
        image = pipeline.vae.decode(torch.empty(1, 16, 90, 90, device="meta", dtype=torch.bfloat16)).sample
    assert velocity.shape == (1, 2025, 64) and image.shape == (1, 3, 720, 720)


def test_live_bytes_counts_frees_and_excludes_existing_tensors():
    weight = torch.empty(1024, 1024, device="meta")  # 4 MiB that exist before: not activations
    with memory.LiveBytes([weight]) as tracker:
        hidden = torch.empty(256, 1024, device="meta")  # 1 MiB
        first = hidden @ weight  # +1 MiB -> 2 MiB
        del hidden  # -> 1 MiB
        second = first @ weight.t()  # view of the weight: not counted; +1 MiB -> 2 MiB
        del first, second  # -> 0
        last = torch.empty(512, 1024, device="meta")  # 2 MiB
    assert tracker.peak == 2 * 2**20
    assert tracker.current == 2 * 2**20
    del last


def test_fused_attention_on_meta_does_not_materialize_scores():
    query = torch.empty(1, 2, 4096, 64, device="meta", dtype=torch.bfloat16)
    scores = 2 * 4096 * 4096 * 2  # what the N x N attention weights of 2 heads would take in bf16
    original = torch.nn.functional.scaled_dot_product_attention
    with memory.fused_attention_on_meta(), memory.LiveBytes([query]) as tracker:
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    assert 0 < tracker.peak < scores / 10
    assert torch.nn.functional.scaled_dot_product_attention is original
    with memory.LiveBytes([query]) as tracker:
        torch.nn.functional.scaled_dot_product_attention(query, query, query)
    assert tracker.peak >= scores  # the default meta implementation does materialize them


@pytest.fixture(scope="module")
def memory_report():
    """``benchmarks/memory.py --json``: about 35 s of CPU (passes of the full-size models on the meta device)."""
    return json.loads(run_script("benchmarks/memory.py", "--json"))


@pytest.mark.slow
def test_memory_parameter_counts_match_the_published_models(memory_report):
    counts = memory_report["recipes"]["lora"]["parameters"]
    published = {"transformer": 11.9e9, "t5_xxl": 4.76e9, "clip_l_text": 123e6, "clip_vit_h_14": 986e6, "vae": 83.8e6}
    for name, value in published.items():
        assert abs(counts[name] - value) / value < 0.005, (name, counts[name])


@pytest.mark.slow
def test_memory_totals_are_the_sum_of_their_components(memory_report):
    for recipe in memory_report["recipes"].values():
        rows = recipe["rows"]
        for column in ("before", "after"):
            total = recipe["totals"][column]
            held = sum(row[column] for row in rows if row["phase"] is None)
            phases = {}
            for row in rows:
                if row["phase"] is not None:
                    phases[row["phase"]] = phases.get(row["phase"], 0) + row[column]
            assert total["held"] == pytest.approx(held)
            assert total["peak_phase"] == max(phases, key=phases.get)
            assert total["total"] == pytest.approx(held + max(phases.values()))
            assert all(row[column] >= 0 for row in rows)


@pytest.mark.slow
def test_memory_after_fits_the_targets(memory_report):
    for name, recipe in memory_report["recipes"].items():
        after = recipe["totals"]["after"]["total"] / GIB
        assert after <= recipe["target_gib"], f"{name}: {after:.1f} GiB computed, target {recipe['target_gib']}"
        before = recipe["totals"]["before"]["total"]
        assert recipe["totals"]["after"]["total"] < before


@pytest.mark.slow
def test_memory_markdown_matches_docs(memory_report):
    """docs/distributed.md holds the output of `python benchmarks/memory.py` (regenerate it when this fails).

    Other library versions build some models differently (e.g. T5's attention), so the comparison needs the
    versions the tables were computed with; their source line names them.
    """
    with open(os.path.join(REPO, "docs", "distributed.md")) as f:
        docs = f.read()
    tables = memory.markdown(memory_report)
    source_line = tables.splitlines()[0]
    assert "Computed on the meta device by `benchmarks/memory.py` with " in docs, "the memory tables are missing"
    if source_line not in docs:
        pytest.skip(
            f"docs/distributed.md's memory tables were computed with other library versions than these ({source_line})"
        )
    assert tables in docs
