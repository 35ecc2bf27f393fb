"""Wan (text-to-video) through the adapter interface, on the tiny offline WanPipeline: the anchor is the pipeline's
own sample (classifier-free guidance with a negative prompt, and without guidance), the rollout engine, SDE step
and entropy work on 5-D latents, on-policy ratios are 1, training raises a reward, the saved LoRA loads into a
plain ``WanPipeline``, bad input is a clear error, video rewards and frame strips have their closed forms, and the
recipe states its schedule's merge plan."""

import importlib.util
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from diffusers import WanPipeline  # noqa: E402
from trl import TrlParser  # noqa: E402

from helpers import assert_reward_rose  # noqa: E402
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, plan_merges  # noqa: E402
from trl_flow_egrpo.adapters import WanAdapter, get_adapter  # noqa: E402
from trl_flow_egrpo.merging import step_entropy  # noqa: E402
from trl_flow_egrpo.registry import build_reward, describe_reward  # noqa: E402
from trl_flow_egrpo.rewards import BrightnessReward, ColorReward, FrameAverageReward, TemporalConsistencyReward  # noqa: E402
from trl_flow_egrpo.rollout import sample_ode, sample_rollouts  # noqa: E402
from trl_flow_egrpo.scoring import score_images  # noqa: E402
from trl_flow_egrpo.sde import gaussian_log_prob, sde_step  # noqa: E402
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline  # noqa: E402
from trl_flow_egrpo.tracking import image_grid  # noqa: E402

PROMPTS = ["a red apple", "a fire truck", "a cat on a mat", "sunset over the sea", "a rose", "a bowl of cherries"]
EVAL_PROMPTS = ["a red apple", "a rose", "a car", "the sea", "a cat", "a bowl of cherries", "fire", "a house"]
NEGATIVE = "blurry, static"
SIZE, FRAMES, SEQUENCE_LENGTH = 32, 5, 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wan_trainer(
    output_dir, pipeline=None, reward=None, eval_dataset=None, eval_reward_fns=None, **overrides
) -> EGRPOTrainer:
    """An EGRPOTrainer on the tiny Wan pipeline: 32x32, 5 frames, 4 steps (2 trained), 6 rollouts per group,
    float32, the per-frame colour reward."""
    values = dict(
        output_dir=str(output_dir),
        height=SIZE,
        width=SIZE,
        num_frames=FRAMES,
        max_sequence_length=SEQUENCE_LENGTH,
        num_inference_steps=4,
        num_active_steps=2,
        num_generations=6,
        prompts_per_device=2,
        shift=None,
        guidance_scale=1.0,
        mixed_precision="no",
        learning_rate=3e-2,
        clip_range=1e-2,
        lora_r=8,
        lora_alpha=8,
        rollout_batch_size=64,
        per_device_train_batch_size=4,
        save_steps=0,
        max_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return EGRPOTrainer(
        EGRPOConfig(**values),
        pipeline or build_tiny_wan_pipeline(seed=0),
        [reward or FrameAverageReward(ColorReward())],
        Dataset.from_dict({"prompt": PROMPTS}),
        eval_dataset=eval_dataset,
        eval_reward_fns=eval_reward_fns,
    )


def pipeline_videos(pipeline, adapter, prompts, noise, num_steps, output_type):
    """``WanPipeline.__call__`` from ``noise`` with the adapter's guidance, negative prompt and frame count, its
    scheduler replaced by the adapter's Euler scheduler (the released UniPC one is a multistep solver); the
    pipeline spaces the sigmas itself. Returns the pipeline's ``frames`` (latents for ``output_type="latent"``)."""
    negative = (
        {"negative_prompt": [adapter.negative_prompt] * len(prompts)} if adapter.do_classifier_free_guidance else {}
    )
    pipeline.scheduler = adapter.euler_scheduler(None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        prompt=prompts,
        latents=noise.clone(),
        num_inference_steps=num_steps,
        guidance_scale=adapter.guidance_scale,
        height=adapter.height,
        width=adapter.width,
        num_frames=adapter.num_frames,
        max_sequence_length=adapter.max_sequence_length,
        output_type=output_type,
        **negative,
    ).frames


def wan_adapter(pipe, **overrides) -> WanAdapter:
    """The tiny pipeline's adapter at 32x32, 5 frames."""
    values = dict(height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=SEQUENCE_LENGTH)
    values.update(overrides)
    return get_adapter(pipe, **values)


@torch.no_grad()
def test_adapter_is_registered_and_draws_the_pipelines_noise():
    pipe = build_tiny_wan_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=64)
    assert isinstance(adapter, WanAdapter) and adapter.is_video
    assert adapter.guidance_scale == WanAdapter.default_guidance_scale == 5.0
    assert adapter.num_frames == 81 and adapter.latent_frames == 21  # the pipeline's default
    adapter = wan_adapter(pipe, width=64)
    noise = adapter.initial_noise(3, torch.Generator().manual_seed(7))
    assert noise.shape == (3, 16, 2, SIZE // 8, 64 // 8) and noise.dtype == torch.float32
    expected = pipe.prepare_latents(3, 16, SIZE, 64, FRAMES, torch.float32, "cpu", torch.Generator().manual_seed(7))
    torch.testing.assert_close(noise, expected, rtol=0, atol=0)
    assert adapter.num_video_tokens == 2 * (SIZE // 16) * (64 // 16)


def test_bad_input_is_a_clear_error(tmp_path):
    pipe = build_tiny_wan_pipeline()
    with pytest.raises(ValueError, match="height=40: Wan needs image sizes that are positive multiples of 16"):
        wan_adapter(pipe, height=40)
    with pytest.raises(
        ValueError,
        match=r"num_frames=6: Wan needs 4k \+ 1 frames .* Set EGRPOConfig.num_frames "
        "to e.g. 5 or 9",
    ):
        wan_trainer(tmp_path, pipeline=pipe, num_frames=6)
    with pytest.raises(ValueError, match="num_frames=0: .* to e.g. 1"):
        wan_adapter(pipe, num_frames=0)
    with pytest.raises(ValueError, match="negative_prompt='blurry, static': classifier-free guidance is off"):
        wan_trainer(tmp_path, pipeline=pipe, guidance_scale=1.0, negative_prompt=NEGATIVE)
    with pytest.raises(ValueError, match="num_frames=5: FluxPipeline generates images, not videos"):
        get_adapter(build_tiny_flux_pipeline(), height=64, width=64, num_frames=5)
    two_experts = WanPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=pipe.transformer,
        transformer_2=build_tiny_wan_pipeline(seed=1).transformer,
        scheduler=pipe.scheduler,
        boundary_ratio=0.875,
    )
    with pytest.raises(ValueError, match="two transformers .* boundary_ratio=0.875.*single-transformer Wan"):
        wan_adapter(two_experts)
    with pytest.raises(ValueError, match="has no flow_shift: set EGRPOConfig.shift"):
        pipe.scheduler.register_to_config(flow_shift=None)
        wan_adapter(pipe).schedule(4, None)


@pytest.mark.parametrize(
    "guidance_scale, negative_prompt",
    [
        pytest.param(5.0, NEGATIVE, id="cfg-5-negative"),
        pytest.param(5.0, "", id="cfg-5-pipeline-default-negative"),
        pytest.param(1.0, "", id="no-cfg"),
    ],
)
def test_anchor_trajectory_is_the_pipelines_sample(guidance_scale, negative_prompt):
    pipe = build_tiny_wan_pipeline()
    adapter = wan_adapter(pipe, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
    num_steps = 6
    schedule = adapter.schedule(num_steps, shift=None)  # the scheduler's flow_shift 3.0
    prompts = ["a red apple", "a fire truck on a bridge at night"]
    noise = adapter.initial_noise(len(prompts), torch.Generator().manual_seed(0))
    plan = plan_merges(schedule.sigmas, 0.7, 2.2, 3, "adaptive", "overlap")
    # Batches of 5 rows mix anchors and branches at different timesteps, as in training.
    rollouts = sample_rollouts(
        adapter,
        pipe.transformer,
        schedule,
        plan,
        adapter.encode_prompts(prompts),
        noise,
        num_generations=2,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(1),
        batch_size=5,
    )

    latents = pipeline_videos(pipe, adapter, prompts, noise, num_steps, "latent")
    torch.testing.assert_close(schedule.sigmas, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    latent_error = (rollouts.anchor_latents - latents).abs().max().item()
    videos = pipeline_videos(pipe, adapter, prompts, noise, num_steps, "pt")
    assert rollouts.anchor_images.shape == videos.shape == (2, FRAMES, 3, SIZE, SIZE)
    assert rollouts.images.shape == (len(prompts) * len(plan), 2, FRAMES, 3, SIZE, SIZE)
    video_error = (rollouts.anchor_images - videos).abs().max().item()
    print(
        f"Wan parity (guidance {guidance_scale}): max |latent error| {latent_error:.1e}, "
        f"max |video error| {video_error:.1e}"
    )
    assert latent_error < 1e-5 and video_error < 1e-5
    # The comparison can fail: the branches left the anchor, and the guidance changes the sample.
    assert (rollouts.images - rollouts.anchor_images[rollouts.group_prompt][:, None]).abs().max() > 1e-3
    other = wan_adapter(pipe, guidance_scale=guidance_scale + 2, negative_prompt=negative_prompt)
    assert (pipeline_videos(pipe, other, prompts, noise, num_steps, "pt") - videos).abs().max() > 1e-3


@torch.no_grad()
def test_wan2_2_per_token_timesteps_follow_the_pipeline():
    # Wan 2.2 TI2V 5B (expand_timesteps=True): its pipeline conditions every video token on the timestep.
    pipe = build_tiny_wan_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    adapter = wan_adapter(pipe, guidance_scale=5.0, negative_prompt=NEGATIVE)
    prompts = ["a red apple", "a fire truck"]
    noise = adapter.initial_noise(len(prompts), torch.Generator().manual_seed(0))
    conditioning, schedule = adapter.encode_prompts(prompts), adapter.schedule(6, None)
    timesteps = []

    def recording_transformer(**kwargs):
        timesteps.append(kwargs["timestep"])
        return pipe.transformer(**kwargs)

    adapter.velocity(recording_transformer, noise, schedule.timesteps[[0, 3]], conditioning)
    expected = schedule.timesteps[[0, 3, 0, 3]][:, None].expand(4, adapter.num_video_tokens)  # [cond, negative]
    torch.testing.assert_close(timesteps[0], expected, rtol=0, atol=0)
    latents = sample_ode(adapter, pipe.transformer, schedule, conditioning, noise, batch_size=len(prompts))
    torch.testing.assert_close(latents, pipeline_videos(pipe, adapter, prompts, noise, 6, "latent"), rtol=0, atol=1e-5)


def test_schedule_is_the_euler_pipelines_and_takes_a_static_shift():
    pipe = build_tiny_wan_pipeline()
    adapter = wan_adapter(pipe)
    released = adapter.schedule(8, None)
    shifted = adapter.schedule(8, 5.0)
    # shift(linspace(1, shift(1/1000), T)) with 0 appended: WanPipeline passes no sigmas.
    for schedule, shift in ((released, 3.0), (shifted, 5.0)):
        low = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
        base = torch.linspace(1, low, 8, dtype=torch.float64)
        expected = torch.cat([shift * base / (1 + (shift - 1) * base), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(schedule.sigmas.double(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000, rtol=0, atol=1e-3)


@torch.no_grad()
def test_sde_step_and_entropy_do_not_depend_on_the_latent_layout():
    # The same numbers as video latents [B, C, F, h, w] and as tokens [B, N, C]: the step, its log-probability
    # and the merge plan's entropy are per element, so the layout must not matter.
    generator = torch.Generator().manual_seed(0)
    video = torch.randn(3, 16, 2, 4, 4, generator=generator)
    velocity = torch.randn(3, 16, 2, 4, 4, generator=generator)
    noise = torch.randn(3, 16, 2, 4, 4, generator=generator)
    sigmas = wan_adapter(build_tiny_wan_pipeline()).schedule(6, None).sigmas
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    start, length = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    as_video = sde_step(video, velocity, sigmas, start, length, 0.7, noise=noise)
    as_tokens = sde_step(tokens(video), tokens(velocity), sigmas, start, length, 0.7, noise=tokens(noise))
    torch.testing.assert_close(tokens(as_video.sample), as_tokens.sample, rtol=0, atol=0)
    torch.testing.assert_close(as_video.log_prob, as_tokens.log_prob, rtol=0, atol=1e-6)
    torch.testing.assert_close(gaussian_log_prob(as_video.sample, as_video.mean, as_video.std), as_video.log_prob)
    assert as_video.log_prob.shape == as_video.std.shape == (3,)
    # The merge plan's entropy is the per-element entropy of this step: exp(h) = sqrt(2 pi e) std.
    for row in range(3):
        expected = math.sqrt(2 * math.pi * math.e) * float(as_video.std[row])
        assert step_entropy(sigmas, int(start[row]), int(length[row]), 0.7) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "guidance_scale, negative_prompt, algorithm",
    [(1.0, "", "e-grpo"), (5.0, NEGATIVE, "e-grpo"), (1.0, "", "flow-grpo"), (1.0, "", "mix-grpo")],
)
def test_on_policy_ratios_are_one(tmp_path, guidance_scale, negative_prompt, algorithm):
    # Training micro-batches (3 groups) differ from sampling batches (7 rows); the trajectory algorithms (Flow-GRPO,
    # MixGRPO) run their own rollout path on the same 5-D latents.
    trainer = wan_trainer(
        tmp_path,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        algorithm=algorithm,
        rollout_batch_size=7,
        per_device_train_batch_size=3,
    )
    metrics = trainer.step()
    assert metrics["ratio/on_policy_max_abs_dev"] < 1e-5
    if algorithm == "e-grpo":
        assert metrics["transformer_evaluations"] == 2 * trainer.evaluations_per_prompt()
    assert metrics["grad_norm"] > 0


def test_training_raises_the_reward(tmp_path):
    reward = FrameAverageReward(ColorReward())
    trainer = wan_trainer(tmp_path, reward=reward, max_steps=12, learning_rate=5e-2)
    before = reward(trainer.sample_images(EVAL_PROMPTS, seed=123), EVAL_PROMPTS)
    history = trainer.train().log_history
    after = reward(trainer.sample_images(EVAL_PROMPTS, seed=123), EVAL_PROMPTS)
    assert_reward_rose(before, after, min_gain=0.004)
    assert len(history) == 12 and all(torch.isfinite(torch.tensor(m["loss"])) for m in history)


def test_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    # lora_alpha != r: the loaded LoRA must keep its scale; guidance on: the CFG pair uses the LoRA too.
    trainer = wan_trainer(
        tmp_path, guidance_scale=5.0, negative_prompt=NEGATIVE, lora_alpha=16, max_steps=2, learning_rate=5e-2
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "lora"))
    assert os.path.isfile(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    prompts = EVAL_PROMPTS[:2]
    trained = trainer.sample_images(prompts, seed=5)  # prompt i starts from seed 5 + i
    assert trained.shape == (2, FRAMES, 3, SIZE, SIZE)
    noise = torch.cat(
        [trainer.adapter.initial_noise(1, torch.Generator().manual_seed(5 + i)) for i in range(len(prompts))]
    )

    fresh = build_tiny_wan_pipeline(seed=0)
    fresh.load_lora_weights(str(tmp_path / "lora"))
    torch.testing.assert_close(
        pipeline_videos(fresh, trainer.adapter, prompts, noise, 4, "pt"), trained, rtol=0, atol=1e-5
    )
    base = pipeline_videos(build_tiny_wan_pipeline(seed=0), trainer.adapter, prompts, noise, 4, "pt")
    assert (trained - base).abs().max() > 1e-3  # the LoRA changed the model, so the comparison can fail


def test_frame_average_reward_scores_every_frame_with_its_videos_prompt():
    videos = torch.rand(3, 5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    calls = []

    def recording_brightness(images, prompts, **columns):
        calls.append((len(images), list(prompts), columns))
        return BrightnessReward()(images, prompts)

    reward = FrameAverageReward(recording_brightness, frames_per_call=4)
    scores = reward(videos, ["a", "b", "c"], style=["x", "y", "z"])
    torch.testing.assert_close(scores, videos.mean(dim=(1, 2, 3, 4)))  # mean of per-frame means
    assert [count for count, _, _ in calls] == [4, 4, 4, 3]  # 15 frames in calls of 4
    assert sum((prompts for _, prompts, _ in calls), []) == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert sum((columns["style"] for _, _, columns in calls), []) == ["x"] * 5 + ["y"] * 5 + ["z"] * 5
    strided = FrameAverageReward(BrightnessReward(), frame_stride=2)(videos, ["a", "b", "c"])
    torch.testing.assert_close(strided, videos[:, [0, 2, 4]].mean(dim=(1, 2, 3, 4)))
    assert reward.name == "frames_recording_brightness"
    built = build_reward("frames_brightness")
    assert isinstance(built, FrameAverageReward) and built.name == "frames_brightness"
    assert describe_reward("frames_brightness").startswith("Frame average (video) of Brightness")
    with pytest.raises(
        ValueError,
        match=r"Reward 'frames_brightness' scores videos \[B, F, 3, H, W\].*got "
        r"\(3, 3, 4, 4\)",
    ):
        built(videos[:, 0], ["a", "b", "c"])
    with pytest.raises(ValueError, match="Reward '<lambda>' returned NaN or inf for 15 of 15 images"):
        FrameAverageReward(lambda images, prompts: torch.full((len(images),), float("nan")))(videos, ["a"] * 3)


def test_temporal_consistency_reward_is_minus_the_mean_frame_difference():
    reward = build_reward("temporal_consistency")
    assert isinstance(reward, TemporalConsistencyReward)
    still = torch.rand(1, 1, 3, 4, 4).expand(1, 5, 3, 4, 4)
    flicker = torch.arange(5.0).remainder(2).view(1, 5, 1, 1, 1).expand(1, 5, 3, 4, 4)  # black, white, black...
    ramp = (0.1 * torch.arange(5.0)).view(1, 5, 1, 1, 1).expand(1, 5, 3, 4, 4)  # brighter by 0.1 per frame
    single = torch.rand(1, 1, 3, 4, 4)
    scores = torch.cat([reward(video, ["p"]) for video in (still, flicker, ramp, single)])
    torch.testing.assert_close(scores, torch.tensor([0.0, -1.0, -0.1, 0.0]))
    with pytest.raises(ValueError, match="scores videos"):
        reward(torch.rand(2, 3, 4, 4), ["p", "q"])


def test_rewards_receive_videos_and_return_one_score_per_video():
    videos = torch.rand(4, 5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = [{"prompt": p} for p in "abcd"]
    rewards = [FrameAverageReward(ColorReward()), TemporalConsistencyReward()]
    scores = score_images(rewards, ["frames_color", "temporal_consistency"], videos, rows, "prompt")
    assert scores.shape == (4, 2)
    torch.testing.assert_close(scores[:, 1], -(videos[:, 1:] - videos[:, :-1]).abs().mean(dim=(1, 2, 3, 4)))
    # An image reward handed videos directly is refused with its name, not a deep shape error.
    with pytest.raises(
        ValueError,
        match=r"Reward 'color' failed on videos \(4, 5, 3, 8, 8\) .* "
        r"FrameAverageReward\(<the reward>\) \(registry name 'frames_color'\)",
    ):
        score_images([ColorReward()], ["color"], videos, rows, "prompt")
    with pytest.raises(ValueError, match=r"Reward 'brightness' returned \(4, 8\) values for 4 images"):
        score_images([BrightnessReward()], ["brightness"], videos, rows, "prompt")


def test_video_grid_is_one_frame_strip_per_video():
    # Frame t of video n is filled with (10 n + t) / 255: the grid must show row n, column j = frame j.
    values = (10 * torch.arange(2.0)[:, None] + torch.arange(5.0)[None, :]) / 255
    videos = values.view(2, 5, 1, 1, 1).expand(2, 5, 3, 4, 6)
    grid = image_grid(videos)
    assert grid.shape == (2 * 4, 5 * 6, 3)
    assert grid[::4, ::6, 0].tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    long = (torch.arange(81.0) / 255).view(1, 81, 1, 1, 1).expand(1, 81, 3, 2, 2)
    strip = image_grid(long, max_frames=5)  # evenly spaced, first and last included
    assert strip.shape == (2, 10, 3) and strip[0, ::2, 0].tolist() == [0, 20, 40, 60, 80]


def test_evaluation_scores_videos_and_saves_a_frame_strip_per_video(tmp_path):
    from PIL import Image

    prompts = EVAL_PROMPTS[:3]
    trainer = wan_trainer(
        tmp_path, eval_dataset=Dataset.from_dict({"prompt": prompts}), eval_reward_fns=[TemporalConsistencyReward()]
    )
    metrics = trainer.evaluate()
    videos = trainer.sample_images(prompts, seed=trainer.config.eval_seed)
    reward = FrameAverageReward(ColorReward())
    assert metrics["eval/frames_color/mean"] == pytest.approx(float(reward(videos, prompts).mean()), abs=1e-6)
    assert metrics["eval/temporal_consistency/mean"] < 0  # the frames of a tiny random model differ
    grid = Image.open(tmp_path / "eval_grid.png")
    assert grid.size == (FRAMES * SIZE, len(prompts) * SIZE)  # one row per video, one column per frame
    expected = image_grid(videos)
    numpy.testing.assert_array_equal(numpy.asarray(grid), expected)


def test_recipe_states_the_merge_plan_of_its_schedule():
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    hpd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hpd)
    path = os.path.join(REPO, "examples", "recipes", "wan2_1_t2v_1_3b_lora.yaml")
    script_args, config = TrlParser((hpd.ScriptArguments, EGRPOConfig)).parse_yaml_file(path)  # unknown keys raise
    with open(path) as handle:
        text = handle.read()
    for name in script_args.reward_funcs + script_args.eval_reward_funcs:
        build_reward(name)
    # The tiny pipeline has Wan's VAE factors, patch size and scheduler type, so at the recipe's size, frames and
    # static shift its schedule is the one the real model samples with.
    adapter = get_adapter(
        build_tiny_wan_pipeline(),
        height=config.height,
        width=config.width,
        guidance_scale=config.guidance_scale,
        max_sequence_length=config.max_sequence_length,
        negative_prompt=config.negative_prompt,
        num_frames=config.num_frames,
    )
    assert config.optimizer_step == "active_step" and adapter.do_classifier_free_guidance
    assert config.shift is not None  # the released UniPC scheduler's flow_shift is not the recipe's
    num_steps = config.num_inference_steps
    plan = plan_merges(
        adapter.schedule(num_steps, config.shift).sigmas,
        config.noise_level,
        config.entropy_threshold,
        config.num_active_steps,
        config.merge_length,
        config.merge_windows,
    )
    assert "# merge plan: " + " ".join(f"({step.start}, {step.length})" for step in plan) + "\n" in text
    evaluations = num_steps + config.num_generations * sum(num_steps - step.end for step in plan)
    assert f"Cost: {evaluations} " in text
    assert f"{adapter.latent_frames} latent frames, {adapter.num_video_tokens} video tokens" in text
