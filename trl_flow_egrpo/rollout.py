"""The rollout engine (METHOD.md section 4): anchor trajectories and branched rollouts, batched.

Per prompt: one initial noise; the deterministic anchor trajectory from it; at every start index ``k``
of the merge plan, ``G`` branches leave the anchor with one merged SDE step each (own noise) to
``k + l`` and follow the ODE to the end. Every rollout has exactly one stochastic step.

Everything is advanced in lock step: at each tick every unfinished trajectory (anchors and branches of
all prompts, at whatever schedule index they are) needs one velocity, and they get it from one batched
transformer call with per-sample timesteps (chunked by ``batch_size``). A branch's merged SDE step
needs the velocity at the anchor's own ``(x_k, sigma_k)``, which the anchor computes anyway for its
ODE step, so branching costs no extra evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import Conditioning, ModelAdapter, select_rows
from .merging import MergeStep
from .schedule import Schedule
from .sde import euler_step, sde_step


@dataclass
class Rollouts:
    """The rollouts of one iteration on one process. A group is one (prompt, plan step) pair.

    Attributes:
        group_prompt: ``[num_groups]`` index of each group's prompt (into the iteration's prompts).
        group_step: ``[num_groups]`` index of each group's step in the merge plan.
        group_start: ``[num_groups]`` schedule index ``k`` where the group branches.
        group_length: ``[num_groups]`` merge length ``l`` of the group's SDE step.
        branch_latents: ``[num_groups, ...]`` float32 anchor latents ``x_k`` the group branches from.
        samples: ``[num_groups, G, ...]`` float32 ``x'`` drawn by the merged SDE step.
        log_probs: ``[num_groups, G]`` float32 log-probabilities of ``samples`` at sampling time.
        images: ``[num_groups, G, 3, H, W]`` decoded final images in [0, 1].
        anchor_images: ``[num_prompts, 3, H, W]`` the anchor (ODE) images, for logging only.
        anchor_latents: ``[num_prompts, ...]`` the anchors' final latents.
        conditioning: the prompts' encodings, reused by the policy update.
        num_evaluations: per-sample transformer evaluations spent (forward batch rows).
        num_model_calls: transformer calls made.
    """

    group_prompt: torch.Tensor
    group_step: torch.Tensor
    group_start: torch.Tensor
    group_length: torch.Tensor
    branch_latents: torch.Tensor
    samples: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    anchor_images: torch.Tensor
    anchor_latents: torch.Tensor
    conditioning: Conditioning
    num_evaluations: int
    num_model_calls: int

    @property
    def num_groups(self) -> int:
        """Number of (prompt, plan step) groups."""
        return len(self.group_prompt)


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Join the rollouts of disjoint prompt batches into one, renumbering the prompts in order."""
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part.anchor_images))
    return Rollouts(
        group_prompt=torch.cat([part.group_prompt + offset for part, offset in zip(parts, offsets)]),
        **{name: torch.cat([getattr(part, name) for part in parts])
           for name in ("group_step", "group_start", "group_length", "branch_latents", "samples", "log_probs",
                        "images", "anchor_images", "anchor_latents")},
        conditioning={name: torch.cat([part.conditioning[name] for part in parts]) for name in parts[0].conditioning},
        num_evaluations=sum(part.num_evaluations for part in parts),
        num_model_calls=sum(part.num_model_calls for part in parts))


def batched_velocity(adapter: ModelAdapter, model, latents: torch.Tensor, timesteps: torch.Tensor,
                     conditioning: Conditioning, prompt_rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Velocities for a batch of trajectories, in chunks of ``batch_size`` transformer rows."""
    chunks = []
    for begin in range(0, len(latents), batch_size):
        rows = slice(begin, begin + batch_size)
        chunks.append(adapter.velocity(model, latents[rows], timesteps[rows],
                                       select_rows(conditioning, prompt_rows[rows])))
    return torch.cat(chunks)


def decode_in_chunks(adapter: ModelAdapter, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decode ``[N, ...]`` latents to images in chunks of ``batch_size``."""
    return torch.cat([adapter.decode(latents[i:i + batch_size]) for i in range(0, len(latents), batch_size)])


@torch.no_grad()
def sample_ode(adapter: ModelAdapter, model, schedule: Schedule, conditioning: Conditioning,
               initial_noise: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Deterministic (ODE, Euler) sampling of one trajectory per prompt; returns the final latents.

    This is the anchor trajectory alone: what the pipeline itself samples from the same noise, and what
    evaluation uses (fixed noise in, deterministic images out).
    """
    sigmas = schedule.sigmas.to(initial_noise.device)
    prompts = torch.arange(len(initial_noise), device=initial_noise.device)
    latents = initial_noise.to(torch.float32)
    for index in range(schedule.num_steps):
        timesteps = schedule.timesteps[index].expand(len(latents)).to(latents.device)
        velocity = batched_velocity(adapter, model, latents, timesteps, conditioning, prompts, batch_size)
        latents = euler_step(latents, velocity, sigmas, index)
    return latents


@torch.no_grad()
def sample_images(adapter: ModelAdapter, model, schedule: Schedule, prompts: list[str], seeds: list[int],
                  batch_size: int, decode_batch_size: int | None = None, encode_prompts=None) -> torch.Tensor:
    """Deterministic (ODE) images ``[B, 3, H, W]`` in [0, 1], prompt ``i`` from the noise of ``seeds[i]``.

    Each prompt's noise comes from its own seeded CPU generator, so an image depends on its prompt, seed
    and model only, not on the batch it is sampled in: before/after and base/trained comparisons are
    paired image by image. The trainer's evaluation and ``examples/evaluate.py`` both sample with this.
    ``encode_prompts`` replaces ``adapter.encode_prompts`` (e.g. a caching
    :class:`~trl_flow_egrpo.prompts.PromptEncoder`).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"sample_images needs one seed per prompt, got {len(seeds)} seeds for {len(prompts)} prompts.")
    noise = torch.cat([adapter.initial_noise(1, torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds])
    conditioning = (encode_prompts or adapter.encode_prompts)(prompts)
    latents = sample_ode(adapter, model, schedule, conditioning, noise.to(adapter.device), batch_size)
    return decode_in_chunks(adapter, latents, decode_batch_size or batch_size)


@torch.no_grad()
def sample_rollouts(
    adapter: ModelAdapter,
    model,
    schedule: Schedule,
    plan: list[MergeStep],
    conditioning: Conditioning,
    initial_noise: torch.Tensor,
    num_generations: int,
    noise_level: float,
    generator: torch.Generator,
    batch_size: int,
    decode_batch_size: int | None = None,
) -> Rollouts:
    """Sample the anchors and all branched rollouts of one iteration.

    Args:
        adapter: the model family's adapter.
        model: the denoiser to evaluate (the current policy).
        schedule: the sampling schedule.
        plan: the merge plan (:func:`~trl_flow_egrpo.plan_merges`).
        conditioning: ``adapter.encode_prompts(prompts)``, computed once and shared by all rollouts.
        initial_noise: ``[num_prompts, ...]`` one initial noise per prompt.
        num_generations: ``G``, rollouts per (prompt, plan step) group.
        noise_level: SDE noise level ``a``.
        generator: draws every branch's SDE noise (reproducible: noise is drawn in a fixed order).
        batch_size: transformer rows per call.
        decode_batch_size: images per VAE call (default ``batch_size``).

    Returns:
        :class:`Rollouts`.
    """
    device = initial_noise.device
    sigmas = schedule.sigmas.to(device)
    timesteps = schedule.timesteps.to(device)
    num_steps = schedule.num_steps
    num_prompts = initial_noise.shape[0]
    latent_shape = initial_noise.shape[1:]
    num_groups = num_prompts * len(plan)

    # Group g = (prompt g // len(plan), plan step g % len(plan)).
    group_prompt = torch.arange(num_prompts, device=device).repeat_interleave(len(plan))
    group_step = torch.arange(len(plan), device=device).repeat(num_prompts)
    group_start = torch.tensor([plan[i].start for i in group_step.tolist()], device=device, dtype=torch.long)
    group_length = torch.tensor([plan[i].length for i in group_step.tolist()], device=device, dtype=torch.long)
    branch_latents = torch.empty((num_groups, *latent_shape), device=device)
    samples = torch.empty((num_groups, num_generations, *latent_shape), device=device)
    log_probs = torch.empty((num_groups, num_generations), device=device)
    final_latents = torch.empty((num_groups * num_generations, *latent_shape), device=device)
    anchor_final = torch.empty((num_prompts, *latent_shape), device=device)

    # Live trajectories. `row` is -1 for anchors, else the branch's row in `final_latents`.
    latents = initial_noise.to(torch.float32)
    index = torch.zeros(num_prompts, dtype=torch.long, device=device)
    prompt = torch.arange(num_prompts, device=device)
    row = torch.full((num_prompts,), -1, dtype=torch.long, device=device)
    num_evaluations = num_calls = 0
    plan_starts = torch.tensor([step.start for step in plan], device=device)
    plan_position = torch.full((num_steps,), -1, dtype=torch.long, device=device)
    plan_position[plan_starts] = torch.arange(len(plan), device=device)
    members = torch.arange(num_generations, device=device)

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(num_generations, dim=0)

    while len(latents):
        velocity = batched_velocity(adapter, model, latents, timesteps[index], conditioning, prompt, batch_size)
        num_evaluations += len(latents)
        num_calls += -(-len(latents) // batch_size)

        branching = (row < 0) & torch.isin(index, plan_starts)
        if bool(branching.any()):
            # The anchor's (x_k, v(x_k, sigma_k)) is the start of all G branches of its group.
            anchors = branching.nonzero().squeeze(1)
            starts = index[anchors]
            groups = prompt[anchors] * len(plan) + plan_position[starts]
            lengths = group_length[groups]
            step = sde_step(repeat(latents[anchors]), repeat(velocity[anchors]), sigmas, repeat(starts),
                            repeat(lengths), noise_level, generator=generator)
            branch_latents[groups] = latents[anchors]
            samples[groups] = step.sample.view(len(anchors), num_generations, *latent_shape)
            log_probs[groups] = step.log_prob.view(len(anchors), num_generations)
            branches = (step.sample, repeat(starts + lengths), repeat(prompt[anchors]),
                        (groups[:, None] * num_generations + members).flatten())
        else:
            branches = None

        latents, index = euler_step(latents, velocity, sigmas, index), index + 1
        if branches is not None:
            latents, index, prompt, row = (torch.cat(pair) for pair in zip((latents, index, prompt, row), branches))

        finished = index == num_steps
        if bool(finished.any()):
            is_branch, is_anchor = finished & (row >= 0), finished & (row < 0)
            final_latents[row[is_branch]] = latents[is_branch]
            anchor_final[prompt[is_anchor]] = latents[is_anchor]
            keep = ~finished
            latents, index, prompt, row = latents[keep], index[keep], prompt[keep], row[keep]

    decode_batch_size = decode_batch_size or batch_size
    images = decode_in_chunks(adapter, torch.cat([final_latents, anchor_final]), decode_batch_size)
    branch_images, anchor_images = images[:len(final_latents)], images[len(final_latents):]
    return Rollouts(
        group_prompt=group_prompt, group_step=group_step, group_start=group_start, group_length=group_length,
        branch_latents=branch_latents, samples=samples, log_probs=log_probs,
        images=branch_images.view(num_groups, num_generations, *branch_images.shape[1:]),
        anchor_images=anchor_images, anchor_latents=anchor_final, conditioning=conditioning,
        num_evaluations=num_evaluations, num_model_calls=num_calls)
