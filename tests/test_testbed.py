"""The pretrained FLUX testbed (benchmarks/testbed): its grammar and data, rewards, tokenizers, training
determinism, and the committed pipeline under EGRPOTrainer."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.testbed import CHECKPOINT_DIR, egrpo_config, heldout_prompts, load_testbed_pipeline, train_prompts  # noqa: E402
from benchmarks.testbed.grammar import (  # noqa: E402
    COLOURS,
    POSITIONS,
    SHAPES,
    WORDS,
    SceneObject,
    parse_prompt,
    render_prompts,
    scene_prompt,
    split_prompts,
)
from benchmarks.testbed.rewards import ColourPurityReward, CompositionReward, CountReward, count_objects  # noqa: E402


def render(prompts, seed=0):
    return render_prompts(prompts, 32, torch.Generator().manual_seed(seed))


# --- grammar and data ----------------------------------------------------------------------------------------------


def test_split_holds_out_compositions_unseen_in_training():
    train, heldout = split_prompts()
    assert (len(train), len(heldout)) == (2652, 288)
    assert split_prompts() == (train, heldout)

    def pairs(prompts):
        return {frozenset(parse_prompt(p)) for p in prompts if len(parse_prompt(p)) == 2}

    assert not pairs(train) & pairs(heldout)
    # Every object and every word of the held-out prompts is in the training prompts: only compositions are new.
    train_objects = {obj for prompt in train for obj in parse_prompt(prompt)}
    assert {obj for prompt in heldout for obj in parse_prompt(prompt)} <= train_objects
    assert len(train_objects) == len(COLOURS) * len(SHAPES) * len(POSITIONS)


def test_prompts_round_trip_and_bad_prompts_are_named():
    scene = (SceneObject("red", "circle", "top left"), SceneObject("blue", "square", "bottom right"))
    assert scene_prompt(scene) == "a red circle top left and a blue square bottom right"
    assert parse_prompt(scene_prompt(scene)) == scene
    with pytest.raises(ValueError, match="not a testbed prompt"):
        parse_prompt("a purple circle top left")
    with pytest.raises(ValueError, match="same position"):
        parse_prompt("a red circle centre and a blue square centre")


def test_rendering_is_deterministic_and_jittered():
    prompts = heldout_prompts()[:8]
    first, again, other = render(prompts, seed=3), render(prompts, seed=3), render(prompts, seed=4)
    assert first.shape == (8, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, again)
    assert not torch.equal(first, other)  # another seed jitters the objects differently


# --- rewards -------------------------------------------------------------------------------------------------------


def test_rewards_score_ground_truth_one():
    train, heldout = split_prompts()
    prompts = train[:60] + heldout + train[60::20]
    images = render(prompts, seed=1)
    assert CompositionReward()(images, prompts).tolist() == [1.0] * len(prompts)
    assert CountReward()(images, prompts).tolist() == [1.0] * len(prompts)
    purity = ColourPurityReward()(images, prompts)
    assert purity.min() >= 0.99 and (purity == 1).float().mean() > 0.95  # small triangles: an anti-aliased pixel


@pytest.mark.parametrize(
    "drawn, described, composition, count, purity",
    [
        ("a red circle top left", "a blue circle top left", 0.0, 1.0, 0.0),  # wrong colour
        ("a red circle top left", "a red circle bottom right", 0.0, 1.0, 0.0),  # wrong place
        ("a red circle top left", "a red circle top left and a green square centre", 0.5, 0.5, 0.5),  # one missing
        ("a red circle top left and a green square centre", "a red circle top left", 1.0, 0.0, 1.0),  # an extra object
        ("a yellow triangle top right and a yellow circle bottom left", "a yellow triangle top right", 1.0, 0.0, 1.0),
    ],
)
def test_rewards_score_wrong_images_lower(drawn, described, composition, count, purity):
    images = render([drawn] * 4)
    assert CompositionReward()(images, [described] * 4).tolist() == [composition] * 4
    assert CountReward()(images, [described] * 4).tolist() == [count] * 4
    assert ColourPurityReward()(images, [described] * 4).tolist() == [purity] * 4


def test_purity_is_graded_where_composition_saturates():
    prompts = ["a blue square centre"] * 5
    truth = render(prompts)
    # Blend the whole image towards grey: every step off the pure colour lowers purity; composition, which
    # classifies pixels within 0.5 of the colour, stays at 1 for the first blends.
    blends = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.4])[:, None, None, None]
    images = truth * (1 - blends) + 0.5 * blends
    purity = ColourPurityReward()(images, prompts)
    assert purity[0] == 1.0 and (purity[1:] < purity[:-1]).all()
    assert CompositionReward()(images[:3], prompts[:3]).tolist() == [1.0] * 3


def test_rewards_of_blank_and_noise_images():
    prompts = heldout_prompts()[:4]
    blank = torch.ones(4, 3, 32, 32)
    assert CompositionReward()(blank, prompts).tolist() == [0.0] * 4
    assert CountReward()(blank, prompts).tolist() == [0.0] * 4
    assert ColourPurityReward()(blank, prompts).tolist() == [0.0] * 4
    noise = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert CompositionReward()(noise, prompts).max() < 1


def test_count_separates_touching_objects_of_different_colours():
    image = torch.ones(1, 3, 32, 32)
    image[0, :, 4:12, 4:12] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    image[0, :, 4:12, 12:20] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    assert count_objects(image) == [2]


def test_rewards_refuse_bad_input():
    with pytest.raises(ValueError, match="one prompt per image"):
        CompositionReward()(torch.ones(2, 3, 32, 32), ["a red circle top left"])
    with pytest.raises(ValueError, match="not a testbed prompt"):
        CountReward()(torch.ones(1, 3, 32, 32), ["a cat"])
    with pytest.raises(ValueError, match="one prompt per image"):
        ColourPurityReward()(torch.ones(2, 3, 32, 32), ["a red circle top left"])
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\]"):
        ColourPurityReward()(torch.ones(1, 1, 32, 32), ["a red circle top left"])
    with pytest.raises(ValueError, match="min_pixels_fraction=0 must be in"):
        ColourPurityReward(min_pixels_fraction=0)


# --- tokenizers and text encoders ----------------------------------------------------------------------------------


def test_grammar_words_are_single_tokens_and_prompts_distinguishable():
    pipeline = load_testbed_pipeline(build_if_missing=False)
    for word in WORDS:
        assert len(pipeline.tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        assert len(pipeline.tokenizer_2(word, add_special_tokens=False).input_ids) == 1, word
    prompts = train_prompts()[:60] + heldout_prompts()[:60]
    with torch.no_grad():
        embeds, pooled, _ = pipeline.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)
    for encoding in (embeds.flatten(1), pooled):
        distances = torch.cdist(encoding, encoding) + torch.eye(len(prompts)) * 1e9
        assert distances.min() > 0.02 * encoding.norm(dim=1).median()


# --- training determinism ------------------------------------------------------------------------------------------


def test_training_is_deterministic_from_the_seed():
    from benchmarks.testbed.model import build_untrained_pipeline
    from benchmarks.testbed.train import Recipe, encode_latents, encode_prompt_table, pack, train_transformer, train_vae

    recipe = Recipe(vae_steps=2, vae_batch_size=4, transformer_steps=2, transformer_batch_size=4)
    prompts = train_prompts()[:6]

    def trained_weights(seed):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        pipeline = build_untrained_pipeline(seed)
        images = render(prompts, seed)
        train_vae(pipeline.vae, images, recipe, generator)
        embeds, pooled = encode_prompt_table(pipeline, prompts, recipe.max_sequence_length)
        train_transformer(
            pipeline,
            pack(pipeline, encode_latents(pipeline.vae, images)),
            torch.arange(6),
            embeds,
            pooled,
            recipe,
            generator,
        )
        return {**pipeline.vae.state_dict(), **pipeline.transformer.state_dict()}

    first, again, other = trained_weights(0), trained_weights(0), trained_weights(1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# --- the committed pipeline ----------------------------------------------------------------------------------------


def test_committed_checkpoint_is_small_and_loads_as_flux_pipeline():
    from diffusers import FluxPipeline

    assert (
        sum(os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(CHECKPOINT_DIR) for name in files)
        < 5e6
    )
    assert isinstance(load_testbed_pipeline(build_if_missing=False), FluxPipeline)
    with pytest.raises(FileNotFoundError, match="build.py"):
        load_testbed_pipeline("/nonexistent/testbed", build_if_missing=False)


def test_committed_build_info_matches_the_committed_weights():
    import json

    from benchmarks.testbed.build import BUILD_INFO, weight_hashes

    with open(os.path.join(CHECKPOINT_DIR, BUILD_INFO)) as file:
        info = json.load(file)
    assert info["weights_sha256"] == weight_hashes(CHECKPOINT_DIR)
    assert len(info["weights_sha256"]) == 4  # transformer, VAE, two text encoders


def test_missing_checkpoint_is_built_and_saved_then_loaded(tmp_path, monkeypatch):
    from benchmarks.testbed import build
    from benchmarks.testbed.train import TrainingLog

    # Building for real takes minutes of CPU: stand in the committed pipeline for what build_testbed returns.
    built = []

    def build_testbed(recipe):
        built.append(recipe)
        return load_testbed_pipeline(build_if_missing=False), TrainingLog([(0, 1.0)], [(0, 1.0)], {}, {})

    monkeypatch.setattr(build, "build_testbed", build_testbed)
    directory = str(tmp_path / "testbed")
    pipeline = load_testbed_pipeline(directory)
    assert len(built) == 1 and os.path.exists(os.path.join(directory, build.BUILD_INFO))
    committed = load_testbed_pipeline(build_if_missing=False)
    for name, tensor in committed.transformer.state_dict().items():
        assert torch.equal(pipeline.transformer.state_dict()[name], tensor)
    load_testbed_pipeline(directory)  # present now: loaded, not built again
    assert len(built) == 1


def test_pretrained_beats_its_random_initialization_on_heldout_prompts():
    from benchmarks.testbed.evaluate import ground_truth_images, pipeline_images, with_transformer
    from benchmarks.testbed.model import build_transformer

    pipeline = load_testbed_pipeline(build_if_missing=False)
    torch.manual_seed(0)
    random = with_transformer(pipeline, build_transformer())
    prompts = heldout_prompts()[::18]
    reward = CompositionReward()
    pretrained_reward = reward(pipeline_images(pipeline, prompts, seed=0), prompts).mean()
    random_reward = reward(pipeline_images(random, prompts, seed=0), prompts).mean()
    assert pretrained_reward > random_reward + 0.3
    assert reward(ground_truth_images(prompts, seed=0), prompts).mean() == 1.0


def test_egrpo_step_on_the_testbed_is_on_policy(tmp_path):
    from trl_flow_egrpo import EGRPOTrainer

    config = egrpo_config(
        str(tmp_path), max_steps=1, num_inference_steps=8, num_active_steps=2, prompts_per_device=2, seed=0
    )
    trainer = EGRPOTrainer(
        config, load_testbed_pipeline(build_if_missing=False), [CompositionReward()], train_prompts()[60:70]
    )
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    assert 0 <= metrics["reward/composition/mean"] <= 1


# --- RL raises the held-out reward ---------------------------------------------------------------------------------

LEARNING_SETTINGS = {
    "e-grpo": dict(learning_rate=1e-3, budget=12_000),
    "mix-grpo": dict(learning_rate=5e-4, budget=36_000),
    "flow-grpo": dict(learning_rate=5e-4, budget=24_000),
    "dance-grpo": dict(learning_rate=1e-4, budget=24_000),
}
"""Learning rate and budget (total transformer rows: sampling + 3 x update) of each algorithm's learning run on the
testbed, with the testbed recipe's ``optimizer_step="iteration"``."""

MIN_HELDOUT_GAIN = 0.01
"""The held-out ColourPurityReward gain the learning test requires of E-GRPO and MixGRPO.

Without learning the gain is exactly 0: the evaluation is deterministic (same 48 prompts, same noise), and a run
at learning rate 1e-7 gained 7e-6. Measured in .venv (seeds 0 and 1) at :data:`LEARNING_SETTINGS`: E-GRPO +0.023,
+0.027; MixGRPO +0.023, +0.031 (at 1e-3 and 12,000 rows +0.013 and +0.055; at 7e-4 and 24,000 rows -0.008 and
+0.025; at 2e-3 -0.11). Each run takes about 15 (E-GRPO) and 40 (MixGRPO) CPU seconds."""

MAX_HELDOUT_DROP = 0.03
"""How far the held-out reward may fall in the runs of Flow-GRPO and DanceGRPO, which do not raise it reliably.

Measured in .venv (gain at seeds 0 and 1). Flow-GRPO (official KL 0.01, batch-wide std): at 1e-3 and 12,000 rows
+0.031, -0.023; at 5e-4 and 24,000 rows +0.040, -0.0085: the sign follows the seed. DanceGRPO (faithful: random
steps of the first T-1 only, eta 0.3): seed 0 at 24,000 rows, learning rate 1e-4 +0.0008, 3e-4 -0.0009, 5e-4 -0.0145;
at 12,000 rows, 1e-3 -0.023 (seed 1 -0.037), 3e-3 -0.11; at 1e-4 seed 1 +0.0071. No learning rate tried raises
it by 0.01 (before the steps were made faithful, 1e-3 gave +0.022). The bound is 3.5 times the worst drop at these
settings and far above a diverging run (-0.11), so the test still catches an update that wrecks the model."""


def heldout_gain(algorithm: str, seed: int = 0) -> tuple[float, float]:
    """Held-out reward before and after the ``seed`` run of ``algorithm`` at its :data:`LEARNING_SETTINGS`, with the
    learning-efficiency benchmark's shared settings."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import learning_efficiency

    settings = LEARNING_SETTINGS[algorithm]
    mode = learning_efficiency.Mode(budget=settings["budget"], eval_points=1, seeds=(seed,), num_eval_prompts=48)
    backend = learning_efficiency.testbed_backend(learning_efficiency.REPO, mode.num_eval_prompts)
    # The testbed recipe's optimizer step, and the 48 held-out prompts these gains were measured on (every 6th),
    # as before the benchmark moved to per-arm learning rates and report/validation splits.
    heldout = heldout_prompts()
    backend.eval_prompts["heldout"] = heldout[:: len(heldout) // 48][:48]
    fields = dict(algorithm=algorithm, optimizer_step="iteration")
    job = learning_efficiency.make_job(algorithm, fields, settings["learning_rate"], seed, "heldout")
    points = learning_efficiency.run_curve(backend, job, mode)["points"]
    return points[0]["reward"], points[-1]["reward"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["e-grpo", "mix-grpo"])
def test_rl_raises_the_heldout_reward(algorithm):
    before, after = heldout_gain(algorithm)
    assert after - before > MIN_HELDOUT_GAIN, (algorithm, before, after)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["flow-grpo", "dance-grpo"])
def test_flow_and_dance_grpo_train_the_testbed_without_wrecking_it(algorithm):
    # They do not raise the held-out reward reliably (MAX_HELDOUT_DROP): what is true at every seed tried is that
    # their runs leave it within a small band, while a diverging update drops it by 0.11.
    before, after = heldout_gain(algorithm)
    assert after != before, (algorithm, before)  # the LoRA moved
    assert after - before > -MAX_HELDOUT_DROP, (algorithm, before, after)
