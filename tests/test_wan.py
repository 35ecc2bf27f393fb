"""Wan (text-to-video) specifics, on the tiny offline WanPipeline: the adapter is a video adapter with the
pipeline's frame count, Wan 2.2's per-token timesteps follow the pipeline, the schedule is the Euler pipeline's, the
SDE step and entropy work on 5-D latents, bad frame counts and unsupported checkpoints are clear errors, and video
rewards, frame strips and evaluation have their closed forms. The checks every family shares (the anchor is the
pipeline's own sample with classifier-free guidance and a negative prompt, and without guidance; on-policy ratios,
also for Flow-GRPO and MixGRPO; training; LoRA round trip; clear errors; the recipe's merge plan) are in
``test_conformance.py``."""

import math

import numpy
import pytest
import torch
from datasets import Dataset
from diffusers import WanPipeline

from families import EVAL_PROMPTS, NEGATIVE, WAN
from trl_flow_egrpo.adapters import get_adapter
from trl_flow_egrpo.merging import step_entropy
from trl_flow_egrpo.registry import build_reward, describe_reward
from trl_flow_egrpo.rewards import BrightnessReward, ColorReward, FrameAverageReward, TemporalConsistencyReward
from trl_flow_egrpo.rollout import sample_ode
from trl_flow_egrpo.scoring import score_images
from trl_flow_egrpo.sde import gaussian_log_prob, sde_step
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline, build_tiny_wan_pipeline
from trl_flow_egrpo.tracking import image_grid

SIZE, FRAMES = WAN.size, WAN.adapter_kwargs["num_frames"]


@torch.no_grad()
def test_adapter_is_a_video_adapter_with_the_pipelines_frame_count():
    pipe = build_tiny_wan_pipeline()
    adapter = get_adapter(pipe, height=SIZE, width=64)
    assert adapter.is_video
    assert adapter.num_frames == 81 and adapter.latent_frames == 21  # the pipeline's default
    assert WAN.adapter(pipe, width=64).num_video_tokens == 2 * (SIZE // 16) * (64 // 16)


def test_bad_frame_counts_and_checkpoints_are_clear_errors(tmp_path):
    pipe = build_tiny_wan_pipeline()
    with pytest.raises(
        ValueError,
        match=r"num_frames=6: Wan needs 4k \+ 1 frames .* Set EGRPOConfig.num_frames "
        "to e.g. 5 or 9",
    ):
        WAN.trainer(tmp_path, pipeline=pipe, num_frames=6)
    with pytest.raises(ValueError, match="num_frames=0: .* to e.g. 1"):
        WAN.adapter(pipe, num_frames=0)
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
        WAN.adapter(two_experts)
    with pytest.raises(ValueError, match="has no flow_shift: set EGRPOConfig.shift"):
        pipe.scheduler.register_to_config(flow_shift=None)
        WAN.adapter(pipe).schedule(4, None)


@torch.no_grad()
def test_wan2_2_per_token_timesteps_follow_the_pipeline():
    # Wan 2.2 TI2V 5B (expand_timesteps=True): its pipeline conditions every video token on the timestep.
    pipe = build_tiny_wan_pipeline()
    pipe.register_to_config(expand_timesteps=True)
    adapter = WAN.adapter(pipe, guidance_scale=5.0, negative_prompt=NEGATIVE)
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
    torch.testing.assert_close(latents, WAN.sample(pipe, adapter, prompts, noise, 6, "latent"), rtol=0, atol=1e-5)


def test_schedule_is_the_euler_pipelines_and_takes_a_static_shift():
    pipe = build_tiny_wan_pipeline()
    adapter = WAN.adapter(pipe)
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
    sigmas = WAN.adapter(build_tiny_wan_pipeline()).schedule(6, None).sigmas
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
    trainer = WAN.trainer(
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
