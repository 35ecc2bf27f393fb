"""The example scripts end to end on the tiny pipeline, as a user runs them: a YAML recipe plus command-line
overrides, prompt files laid out as on the Hub, wandb (offline) and tensorboard logging, then evaluation."""

import glob
import json
import os
import subprocess
import sys

import pytest

# The runs log to both trackers (the dev extras install them).
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RECIPE = """\
model_name_or_path: tiny
torch_dtype: float32
reward_funcs: [color]
eval_reward_funcs: [brightness]
dataset_name: {prompts}
eval_dataset_name: zhwang/HPDv2
eval_dataset_split: photo
num_eval_prompts: 3
hpd_local_dir: {hpd}

output_dir: {yaml_output}
max_steps: 1
learning_rate: 0.01
log_with: wandb,tensorboard
eval_steps: 1
save_steps: 2
disable_tqdm: true
height: 64
width: 64
max_sequence_length: 32
num_inference_steps: 8
num_active_steps: 4
num_generations: 4
prompts_per_device: 2
rollout_batch_size: 32
per_device_train_batch_size: 4
clip_range: 0.01
lora_r: 8
lora_alpha: 8
mixed_precision: "no"
"""


def run_script(args, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               WANDB_DIR=str(tmp_path), HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")  # 1 thread: far faster on a shared CPU
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """examples/hpd.py run once: a recipe with max_steps 1 and learning_rate 0.01, overridden on the command line."""
    tmp = tmp_path_factory.mktemp("examples")
    hpd = tmp / "hpd"  # laid out as the Hub repositories zhwang/HPDv2 and ymhao/HPDv2
    (hpd / "benchmark").mkdir(parents=True)
    (hpd / "benchmark" / "photo.json").write_text(json.dumps(["a lighthouse", "a lake at noon", "a red door",
                                                              "a bicycle"]))
    (hpd / "test.json").write_text(json.dumps([{"prompt": prompt, "image_path": ["0.jpg", "1.jpg"], "rank": [1, 2],
                                                "raw_annotations": []} for prompt in ("a fox", "a barn", "a kite")]))
    prompts = tmp / "prompts.txt"
    prompts.write_text("a red apple\na fire truck\na cat on a mat\nsunset over the sea\n")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(prompts=prompts, hpd=hpd, yaml_output=tmp / "yaml-output"))
    output_dir = tmp / "run"
    log = run_script(["examples/hpd.py", "--config", str(recipe), "--max_steps", "2", "--learning_rate", "0.02",
                      "--output_dir", str(output_dir)], tmp)
    return tmp, output_dir, log


def test_hpd_runs_a_recipe_with_command_line_overrides(trained):
    tmp, output_dir, log = trained
    assert not (tmp / "yaml-output").exists()
    with open(output_dir / "checkpoint-2" / "trainer_state.json") as handle:
        state = json.load(handle)
    assert state["iteration"] == 2
    assert state["config"]["max_steps"] == 2 and state["config"]["learning_rate"] == 0.02  # command line
    assert state["config"]["num_generations"] == 4 and state["config"]["eval_steps"] == 1  # recipe
    assert len(state["eval_history"]) == 2
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (output_dir / "eval_grid.png").is_file()
    assert "Prompts: 4 for training" in log and "3 for evaluation (zhwang/HPDv2, photo)" in log
    assert "| step | start k | length l |" in log  # the merge plan, logged at start
    assert "Evaluation at iteration 2: eval/color/mean" in log


def test_hpd_logs_evaluation_to_tensorboard_and_wandb(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, output_dir, _ = trained
    events = EventAccumulator(str(output_dir / "logs" / "trl-flow-egrpo"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"eval/color/mean", "eval/brightness/mean", "reward/color/mean"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("eval/color/mean")] == [1, 2]
    assert "eval/images" in tags["images"]

    runs = glob.glob(str(tmp / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    assert glob.glob(os.path.join(runs[0], "files", "media", "images", "eval", "images_*.png"))
    with open(glob.glob(os.path.join(runs[0], "run-*.wandb"))[0], "rb") as handle:
        assert b"eval/color/mean" in handle.read()


def test_evaluate_scores_base_and_trained_side_by_side(trained):
    tmp, output_dir, _ = trained
    results = tmp / "scores.json"
    log = run_script(["examples/evaluate.py", "--model_name_or_path", "tiny", "--torch_dtype", "float32",
                      "--trained_model", str(output_dir), "--metrics", "color", "brightness",
                      "--hpd_local_dir", str(tmp / "hpd"), "--height", "64", "--width", "64",
                      "--max_sequence_length", "32", "--num_inference_steps", "8", "--results_file", str(results)],
                     tmp)
    scores = json.loads(results.read_text())
    assert scores["num_prompts"] == 3  # the HPD test prompts
    assert scores["scores"]["base"].keys() == scores["scores"]["trained"].keys() == {"color", "brightness"}
    assert scores["scores"]["trained"]["color"] != scores["scores"]["base"]["color"]  # the LoRA was applied
    assert "| metric | base | trained | trained - base | paper base |" in log
    assert f"| color | {scores['scores']['base']['color']:.4f} | {scores['scores']['trained']['color']:.4f} |" in log
