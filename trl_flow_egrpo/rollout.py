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

import functools
from dataclasses import dataclass

import torch

from .adapters import Conditioning, ModelAdapter, select_rows
from .merging import MergeStep
from .schedule import Schedule
from .sde import euler_step, sample_gaussian_step, sde_step
from .solvers import COMPLETION_SOLVERS, dpmpp_2m_step, strided_completion_indices


@dataclass
class Rollouts:
    """The rollouts of one iteration on one process, whatever the algorithm drew them with.

    A *group* is the ``G`` rollouts whose rewards are normalized together (E-GRPO: one prompt's branches at
    one merged step; Flow-GRPO: one prompt's ``G`` trajectories). A *trained step* is a stochastic step whose
    log-probability the update recomputes: it starts from ``step_latents`` at schedule index ``step_start``,
    spans ``step_length`` intervals and drew ``K`` samples from there. E-GRPO's ``G`` branches of a group
    leave the same anchor latents, so one trained step holds all ``K = G`` of them and the update evaluates
    the policy once for the group; a trajectory algorithm's trained steps hold ``K = 1`` sample each.

    Attributes:
        num_prompts: prompts of the iteration on this process.
        group_prompt: ``[num_groups]`` index of each group's prompt (into the iteration's prompts).
        group_step: ``[num_groups]`` the group's label (E-GRPO: its step's position in the merge plan; else 0).
        images: ``[num_groups, G, 3, H, W]`` decoded final images in [0, 1].
        anchor_images: ``[num_prompts or 0, 3, H, W]`` E-GRPO's anchor (ODE) images, for logging only.
        anchor_latents: ``[num_prompts or 0, ...]`` the anchors' final latents.
        step_latents: ``[num_steps, ...]`` float32 latents ``x_k`` where each trained step starts.
        step_start: ``[num_steps]`` schedule index ``k`` of each trained step.
        step_length: ``[num_steps]`` intervals ``l`` each trained step spans.
        step_prompt: ``[num_steps]`` index of each trained step's prompt.
        step_phase: ``[num_steps]`` which optimizer step of an iteration trains it (``optimizer_step='active_step'``).
        samples: ``[num_steps, K, ...]`` float32 ``x'`` drawn by each trained step.
        log_probs: ``[num_steps, K]`` float32 log-probabilities of ``samples`` at sampling time.
        sample_group: ``[num_steps, K]`` the group of each sample's rollout.
        sample_member: ``[num_steps, K]`` the rollout's position in its group (``0..G-1``).
        conditioning: the prompts' encodings, reused by the policy update.
        num_evaluations: velocity evaluations spent, one per trajectory per step (logged as
            ``trajectory_evaluations``): classifier-free guidance's conditional and negative rows count once.
        num_model_calls: transformer calls made.
        num_transformer_rows: rows of the transformer's forward batches (logged as ``transformer_rows``):
            ``num_evaluations`` times the adapter's
            :attr:`~trl_flow_egrpo.adapters.ModelAdapter.transformer_rows_per_evaluation` (2 under classifier-free
            guidance). What the transformer computes, so what MFU counts.
        group_target: ``[num_groups]`` or None: the group whose trained samples each group's advantages are added
            to (:func:`~trl_flow_egrpo.advantages.sum_advantages_into_targets`). E-GRPO's
            ``completion_granularities`` score each sample ``x'`` once per stride, in groups of their own that
            all target the first stride's group. None: each group targets itself.
        step_velocity: ``[num_steps, ...]`` or None: the forward-process methods (DiffusionNFT, AWM) train on
            forward-noised clean samples: ``step_latents`` is then the clean sample ``x0``, ``samples[:, 0]`` the
            forward noise ``eps`` and ``step_start`` the index of ``t = sigma_k``; this holds the sampling
            policy's velocity at ``x_t = (1 - t) x0 + t eps``. None for the other algorithms.
    """

    num_prompts: int
    group_prompt: torch.Tensor
    group_step: torch.Tensor
    images: torch.Tensor
    anchor_images: torch.Tensor
    anchor_latents: torch.Tensor
    step_latents: torch.Tensor
    step_start: torch.Tensor
    step_length: torch.Tensor
    step_prompt: torch.Tensor
    step_phase: torch.Tensor
    samples: torch.Tensor
    log_probs: torch.Tensor
    sample_group: torch.Tensor
    sample_member: torch.Tensor
    conditioning: Conditioning
    num_evaluations: int
    num_model_calls: int
    num_transformer_rows: int
    group_target: torch.Tensor | None = None
    step_velocity: torch.Tensor | None = None

    @property
    def num_groups(self) -> int:
        """Number of groups."""
        return len(self.group_prompt)

    @property
    def advantage_target(self) -> torch.Tensor:
        """``[num_groups]`` the group whose samples each group's advantages train: :attr:`group_target`, or
        every group itself when it is None."""
        if self.group_target is None:
            return torch.arange(self.num_groups, device=self.group_prompt.device)
        return self.group_target


def concat_rollouts(parts: list[Rollouts]) -> Rollouts:
    """Join the rollouts of disjoint prompt batches into one, renumbering prompts and groups in order."""
    prompt_offsets, group_offsets = [0], [0]
    for part in parts[:-1]:
        prompt_offsets.append(prompt_offsets[-1] + part.num_prompts)
        group_offsets.append(group_offsets[-1] + part.num_groups)

    def shifted(name: str, offsets: list[int]) -> torch.Tensor:
        return torch.cat([getattr(part, name) + offset for part, offset in zip(parts, offsets, strict=True)])

    return Rollouts(
        num_prompts=sum(part.num_prompts for part in parts),
        group_prompt=shifted("group_prompt", prompt_offsets),
        step_prompt=shifted("step_prompt", prompt_offsets),
        sample_group=shifted("sample_group", group_offsets),
        **{
            name: torch.cat([getattr(part, name) for part in parts])
            for name in (
                "group_step",
                "images",
                "anchor_images",
                "anchor_latents",
                "step_latents",
                "step_start",
                "step_length",
                "step_phase",
                "samples",
                "log_probs",
                "sample_member",
            )
        },
        conditioning={name: torch.cat([part.conditioning[name] for part in parts]) for name in parts[0].conditioning},
        num_evaluations=sum(part.num_evaluations for part in parts),
        num_model_calls=sum(part.num_model_calls for part in parts),
        num_transformer_rows=sum(part.num_transformer_rows for part in parts),
        group_target=torch.cat(
            [part.advantage_target + offset for part, offset in zip(parts, group_offsets, strict=True)]
        ),
        step_velocity=None if parts[0].step_velocity is None else torch.cat([part.step_velocity for part in parts]),
    )


def in_adapter_phase(function):
    """Run ``function(adapter, ...)`` inside ``adapter.phase()``: the model's dtype is read once per sampling or
    decoding phase, not at every transformer or VAE call (:meth:`~trl_flow_egrpo.adapters.ModelAdapter.phase`)."""

    @functools.wraps(function)
    def wrapper(adapter: ModelAdapter, *args, **kwargs):
        with adapter.phase():
            return function(adapter, *args, **kwargs)

    return wrapper


def prompt_generators(generator: torch.Generator, num_prompts: int) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded from ``generator``: everything random about a prompt's rollouts
    (its initial noise, its SDE noise) comes from its own generator, so a prompt's rollouts are the same whether
    it is sampled alone or with others (``async_rewards`` samples prompt by prompt). Drawing ``n`` seeds at once
    or one at a time consumes ``generator`` identically."""
    seeds = torch.randint(0, 2**62, (num_prompts,), generator=generator).tolist()
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def as_prompt_generators(generator: torch.Generator | list[torch.Generator], num_prompts: int) -> list[torch.Generator]:
    """``generator`` if it is a list of per-prompt generators, else :func:`prompt_generators` seeded from it."""
    return generator if isinstance(generator, (list, tuple)) else prompt_generators(generator, num_prompts)


def prompt_noise(generators: list[torch.Generator], rows: torch.Tensor, shape, device) -> torch.Tensor:
    """Standard normal noise ``[len(rows), *shape]``, row ``i`` drawn from ``generators[rows[i]]``, rows in order."""
    return torch.stack([torch.randn(tuple(shape), generator=generators[row]) for row in rows.tolist()]).to(device)


def batched_velocity(
    adapter: ModelAdapter,
    model,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    prompt_rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Velocities for a batch of trajectories, in chunks of ``batch_size`` trajectories (the transformer's batch
    holds ``adapter.transformer_rows_per_evaluation`` rows per trajectory: twice as many under classifier-free
    guidance)."""
    chunks = []
    for begin in range(0, len(latents), batch_size):
        rows = slice(begin, begin + batch_size)
        chunks.append(
            adapter.velocity(model, latents[rows], timesteps[rows], select_rows(conditioning, prompt_rows[rows]))
        )
    return torch.cat(chunks)


@in_adapter_phase
def decode_in_chunks(adapter: ModelAdapter, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decode ``[N, ...]`` latents to images in chunks of ``batch_size``."""
    return torch.cat([adapter.decode(latents[i : i + batch_size]) for i in range(0, len(latents), batch_size)])


@torch.no_grad()
@in_adapter_phase
def sample_ode(
    adapter: ModelAdapter,
    model,
    schedule: Schedule,
    conditioning: Conditioning,
    initial_noise: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
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
@in_adapter_phase
def sample_images(
    adapter: ModelAdapter,
    model,
    schedule: Schedule,
    prompts: list[str],
    seeds: list[int],
    batch_size: int,
    decode_batch_size: int | None = None,
    encode_prompts=None,
) -> torch.Tensor:
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


def completion_next_index(num_steps: int, fraction: float, granularities: list[int]) -> torch.Tensor:
    """The completion paths as a lookup table: ``table[p, i]`` is the index after ``i`` on path ``p``, where path
    ``p = g * (T + 1) + c`` is the completion from index ``c`` with the ``g``-th granularity
    (:func:`~trl_flow_egrpo.solvers.strided_completion_indices`); ``-1`` off the path. Each rollout carries its
    path id, so rollouts landing at different indices advance in lock step, each on its own subset of the sigmas."""
    table = torch.full((len(granularities) * (num_steps + 1), num_steps + 1), -1, dtype=torch.long)
    for g, granularity in enumerate(granularities):
        for start in range(num_steps):
            path = strided_completion_indices(num_steps, start, fraction, granularity)
            table[g * (num_steps + 1) + start, path[:-1]] = torch.tensor(path[1:])
    return table


@torch.no_grad()
@in_adapter_phase
def sample_rollouts(
    adapter: ModelAdapter,
    model,
    schedule: Schedule,
    plan: list[MergeStep],
    conditioning: Conditioning,
    initial_noise: torch.Tensor,
    num_generations: int,
    noise_level: float,
    generator: torch.Generator | list[torch.Generator],
    batch_size: int,
    decode_batch_size: int | None = None,
    completion_solver: str = "euler",
    completion_steps_fraction: float = 1.0,
    completion_granularities: list[int] | tuple[int, ...] = (1,),
    sde_type: str = "sde",
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
        generator: one generator per prompt, drawing the SDE noise of that prompt's branches in plan order, so
            that a prompt's rollouts do not depend on the other prompts sampled with it; or one generator, from
            which the per-prompt ones are seeded (:func:`prompt_generators`).
        batch_size: trajectories per transformer call (2 rows each under classifier-free guidance).
        decode_batch_size: images per VAE call (default ``batch_size``).
        completion_solver: the ODE after each branch's merged SDE step (METHOD.md 4b): ``"euler"`` or
            ``"dpmpp_2m"`` (:func:`~trl_flow_egrpo.solvers.dpmpp_2m_step`, first order on its first step). The
            anchors always take every Euler step, so the branch points and the samples ``x'`` do not depend on it.
        completion_steps_fraction: share of the remaining intervals a completion keeps
            (:func:`~trl_flow_egrpo.solvers.completion_indices`).
        completion_granularities: strides; each ``x'`` is completed once per stride, and the completions of
            stride ``granularities[i]`` form groups ``i * num_base_groups + group`` (``Rollouts.group_target``
            maps them to the trained group). ``(1,)``: one completion, the paper.
        sde_type: the branch step's sampler, ``"sde"`` or ``"cps"`` (:func:`~trl_flow_egrpo.sde.step_mean_std`).

    Returns:
        :class:`Rollouts`.
    """
    if completion_solver not in COMPLETION_SOLVERS:
        raise ValueError(f"completion_solver must be one of {COMPLETION_SOLVERS}, got {completion_solver!r}.")
    device = initial_noise.device
    sigmas = schedule.sigmas.to(device)
    timesteps = schedule.timesteps.to(device)
    num_steps = schedule.num_steps
    num_prompts = initial_noise.shape[0]
    latent_shape = initial_noise.shape[1:]
    num_groups = num_prompts * len(plan)
    num_granularities = len(completion_granularities)
    num_branches = num_groups * num_generations  # completions per granularity
    generators = as_prompt_generators(generator, num_prompts)
    next_on_path = completion_next_index(num_steps, completion_steps_fraction, list(completion_granularities))
    next_on_path = next_on_path.to(device)
    multistep = completion_solver == "dpmpp_2m"

    # Group g = (prompt g // len(plan), plan step g % len(plan)).
    group_prompt = torch.arange(num_prompts, device=device).repeat_interleave(len(plan))
    group_step = torch.arange(len(plan), device=device).repeat(num_prompts)
    group_start = torch.tensor([plan[i].start for i in group_step.tolist()], device=device, dtype=torch.long)
    group_length = torch.tensor([plan[i].length for i in group_step.tolist()], device=device, dtype=torch.long)
    branch_latents = torch.empty((num_groups, *latent_shape), device=device)
    samples = torch.empty((num_groups, num_generations, *latent_shape), device=device)
    log_probs = torch.empty((num_groups, num_generations), device=device)
    final_latents = torch.empty((num_granularities * num_branches, *latent_shape), device=device)
    anchor_final = torch.empty((num_prompts, *latent_shape), device=device)

    # Live trajectories. `row` is -1 for anchors, else the completion's row in `final_latents`; `path` is -1 for
    # anchors (every Euler step), else the completion's row of `next_on_path`. DPM-Solver++ 2M keeps each
    # trajectory's last data prediction and its sigma (sigma 1: none yet, the step is first order).
    latents = initial_noise.to(torch.float32)
    index = torch.zeros(num_prompts, dtype=torch.long, device=device)
    prompt = torch.arange(num_prompts, device=device)
    row = torch.full((num_prompts,), -1, dtype=torch.long, device=device)
    path = torch.full((num_prompts,), -1, dtype=torch.long, device=device)
    previous_x0 = torch.zeros_like(latents)
    previous_sigma = torch.ones(num_prompts, device=device)
    num_evaluations = num_calls = 0
    plan_starts = torch.tensor([step.start for step in plan], device=device)
    plan_position = torch.full((num_steps,), -1, dtype=torch.long, device=device)
    plan_position[plan_starts] = torch.arange(len(plan), device=device)
    members = torch.arange(num_generations, device=device)
    view = (-1,) + (1,) * len(latent_shape)

    def repeat(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat_interleave(num_generations, dim=0)

    def per_granularity(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.repeat((num_granularities,) + (1,) * (tensor.dim() - 1))

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
            step = sde_step(
                repeat(latents[anchors]),
                repeat(velocity[anchors]),
                sigmas,
                repeat(starts),
                repeat(lengths),
                noise_level,
                noise=prompt_noise(generators, repeat(prompt[anchors]), latent_shape, device),
                sde_type=sde_type,
            )
            branch_latents[groups] = latents[anchors]
            samples[groups] = step.sample.view(len(anchors), num_generations, *latent_shape)
            log_probs[groups] = step.log_prob.view(len(anchors), num_generations)
            # Each sample x' starts one completion per granularity, granularity-major.
            landing = repeat(starts + lengths)
            offsets = torch.arange(num_granularities, device=device).repeat_interleave(len(landing))
            branch_rows = (groups[:, None] * num_generations + members).flatten()
            branches = (
                per_granularity(step.sample),
                per_granularity(landing),
                per_granularity(repeat(prompt[anchors])),
                offsets * num_branches + per_granularity(branch_rows),
                offsets * (num_steps + 1) + per_granularity(landing),
                torch.zeros((len(offsets), *latent_shape), device=device),
                torch.ones(len(offsets), device=device),
            )
        else:
            branches = None

        # Anchors take every Euler step; a completion jumps to the next index of its path.
        completing = row >= 0
        next_index = torch.where(completing, next_on_path[path.clamp(min=0), index], index + 1)
        step_sigma, next_sigma = sigmas[index], sigmas[next_index]
        advanced = latents + (next_sigma - step_sigma).view(view) * velocity.to(torch.float32)
        if multistep and bool(completing.any()):
            rows = completing.nonzero().squeeze(1)
            advanced[rows], previous_x0[rows] = dpmpp_2m_step(
                latents[rows],
                velocity[rows],
                step_sigma[rows],
                next_sigma[rows],
                previous_x0[rows],
                previous_sigma[rows],
            )
            previous_sigma[rows] = step_sigma[rows]
        state = (advanced, next_index, prompt, row, path, previous_x0, previous_sigma)
        if branches is not None:
            state = tuple(torch.cat(pair) for pair in zip(state, branches, strict=True))
        latents, index, prompt, row, path, previous_x0, previous_sigma = state

        finished = index == num_steps
        if bool(finished.any()):
            is_branch, is_anchor = finished & (row >= 0), finished & (row < 0)
            final_latents[row[is_branch]] = latents[is_branch]
            anchor_final[prompt[is_anchor]] = latents[is_anchor]
            keep = ~finished
            latents, index, prompt, row, path, previous_x0, previous_sigma = (
                tensor[keep] for tensor in (latents, index, prompt, row, path, previous_x0, previous_sigma)
            )

    decode_batch_size = decode_batch_size or batch_size
    images = decode_in_chunks(adapter, torch.cat([final_latents, anchor_final]), decode_batch_size)
    branch_images, anchor_images = images[: len(final_latents)], images[len(final_latents) :]
    # One trained step per group: its G branches share the anchor latents they leave from. The groups of the
    # other granularities score the same samples and add their advantages to it (`group_target`).
    groups = torch.arange(num_groups, device=device)
    granularity = torch.arange(num_granularities, device=device).repeat_interleave(num_groups)
    return Rollouts(
        num_prompts=num_prompts,
        group_prompt=per_granularity(group_prompt),
        group_step=per_granularity(group_step) + granularity * len(plan),
        images=branch_images.view(num_granularities * num_groups, num_generations, *branch_images.shape[1:]),
        anchor_images=anchor_images,
        anchor_latents=anchor_final,
        step_latents=branch_latents,
        step_start=group_start,
        step_length=group_length,
        step_prompt=group_prompt,
        step_phase=group_step,
        samples=samples,
        log_probs=log_probs,
        sample_group=groups[:, None].expand(num_groups, num_generations).clone(),
        sample_member=members[None, :].expand(num_groups, num_generations).clone(),
        conditioning=conditioning,
        num_evaluations=num_evaluations,
        num_model_calls=num_calls,
        num_transformer_rows=num_evaluations * adapter.transformer_rows_per_evaluation,
        group_target=per_granularity(groups),
    )


@torch.no_grad()
@in_adapter_phase
def sample_trajectories(
    adapter: ModelAdapter,
    model,
    schedule: Schedule,
    conditioning: Conditioning,
    latents: torch.Tensor,
    row_prompt: torch.Tensor,
    step_distribution,
    stochastic: torch.Tensor,
    trained: torch.Tensor,
    generator: torch.Generator | list[torch.Generator],
    batch_size: int,
    first_index: int = 0,
    end_index: int | None = None,
    completion: list[int] | None = None,
):
    """Advance ``N`` trajectories in lock step from schedule index ``first_index`` to ``end_index`` (default: the
    end of the schedule), drawing the
    ``stochastic`` steps from ``step_distribution`` and recording the ``trained`` ones (the trajectory
    algorithms: Flow-GRPO, DanceGRPO, MixGRPO, MixGRPO-Flash).

    Args:
        adapter, model, schedule, conditioning, batch_size: as :func:`sample_rollouts`.
        latents: ``[N, ...]`` the trajectories' latents at ``first_index``.
        row_prompt: ``[N]`` each trajectory's prompt (row of ``conditioning``).
        step_distribution: ``fn(latents, velocity, start, length) -> (mean, std)``, the SDE step's Gaussian
            (:meth:`~trl_flow_egrpo.algorithms.RolloutStrategy.step_distribution`), called with ``length = 1``.
        stochastic: ``[T]`` bool, which steps are SDE steps (the others are Euler steps).
        trained: ``[N, T]`` bool, which steps of each trajectory are recorded for training (stochastic ones).
        generator: one generator per prompt (each stochastic step draws a row's noise from its prompt's), or one
            generator seeding them (:func:`prompt_generators`).
        first_index: schedule index the trajectories start at.
        end_index: schedule index where they stop (exclusive), default ``T``.
        completion: MixGRPO-Flash's compressed ODE: increasing schedule indices ``[c, ..., T]``, none of them
            stochastic. The trajectories step index by index up to ``c``, then DPM-Solver++ 2M
            (:func:`~trl_flow_egrpo.solvers.dpmpp_2m_step`) jumps from each index of ``completion`` to the next;
            its first step extrapolates from the data prediction ``x - sigma v`` of the step before ``c`` (the
            solver's history covers every step, as in the official MixGRPO-Flash). None: every step is visited.

    Returns:
        ``(final_latents, steps, num_evaluations, num_calls)`` (``num_evaluations``: velocity evaluations, one per
        trajectory per step); ``steps`` is a list of
        ``(index, rows, latents, samples, log_probs)``, one per recorded schedule index, in time order.
    """
    sigmas = schedule.sigmas.to(latents.device)
    latents = latents.to(torch.float32)
    generators = as_prompt_generators(generator, int(row_prompt.max()) + 1)
    steps, num_evaluations, num_calls = [], 0, 0
    indices = trajectory_indices(schedule.num_steps, first_index, end_index, completion, stochastic)
    previous_x0 = previous_sigma = None  # DPM-Solver++ 2M's history: the last step's data prediction
    for index, next_index in zip(indices[:-1], indices[1:], strict=True):
        timesteps = schedule.timesteps[index].expand(len(latents)).to(latents.device)
        velocity = batched_velocity(adapter, model, latents, timesteps, conditioning, row_prompt, batch_size)
        num_evaluations += len(latents)
        num_calls += -(-len(latents) // batch_size)
        if completion is not None:
            if index >= completion[0]:
                latents, previous_x0 = dpmpp_2m_step(
                    latents, velocity, sigmas[index], sigmas[next_index], previous_x0, previous_sigma
                )
                previous_sigma = sigmas[index]
                continue
            previous_x0, previous_sigma = latents - sigmas[index] * velocity.to(torch.float32), sigmas[index]
        if not bool(stochastic[index]):
            latents = euler_step(latents, velocity, sigmas, index)
            continue
        mean, std = step_distribution(latents, velocity, index, 1)
        step = sample_gaussian_step(
            mean, std, noise=prompt_noise(generators, row_prompt, latents.shape[1:], latents.device)
        )
        rows = trained[:, index].nonzero().squeeze(1).to(latents.device)
        if len(rows):
            steps.append((index, rows, latents[rows], step.sample[rows], step.log_prob[rows]))
        latents = step.sample
    return latents, steps, num_evaluations, num_calls


def trajectory_indices(
    num_steps: int, first_index: int, end_index: int | None, completion: list[int] | None, stochastic: torch.Tensor
) -> list[int]:
    """The schedule indices a trajectory of :func:`sample_trajectories` visits, its last one included: every index
    from ``first_index`` to ``end_index`` (default ``T``), or up to ``completion[0]`` and then ``completion``."""
    if completion is None:
        return list(range(first_index, (num_steps if end_index is None else end_index) + 1))
    if end_index not in (None, num_steps) or completion[-1] != num_steps or completion[0] < first_index:
        raise ValueError(
            f"A completion must run from an index >= first_index ({first_index}) to the end of the schedule "
            f"({num_steps}) with end_index=None; got completion={completion}, end_index={end_index}."
        )
    if any(later <= earlier for earlier, later in zip(completion[:-1], completion[1:], strict=True)):
        raise ValueError(f"completion indices must increase, got {completion}.")
    if bool(stochastic[completion[0] :].any()):
        raise ValueError(f"completion {completion} covers stochastic steps: it must start after the last SDE step.")
    return list(range(first_index, completion[0])) + list(completion)


def trajectory_rollouts(
    steps: list,
    final_latents: torch.Tensor,
    adapter: ModelAdapter,
    num_prompts: int,
    num_generations: int,
    conditioning: Conditioning,
    num_evaluations: int,
    num_calls: int,
    decode_batch_size: int,
) -> Rollouts:
    """:class:`Rollouts` of trajectory algorithms from :func:`sample_trajectories`' output: row ``r`` is
    member ``r % G`` of group (= prompt) ``r // G``; a trajectory's ``j``-th trained step (in time order) is
    trained in phase ``j``, so every optimizer step of ``optimizer_step='active_step'`` sees one step of every
    trajectory."""
    device = final_latents.device
    rows = torch.cat([step[1] for step in steps])
    order = torch.argsort(rows, stable=True)  # steps of each trajectory together, in time order
    rows = rows[order]
    phase = torch.arange(len(rows), device=device) - torch.searchsorted(rows, rows)
    images = decode_in_chunks(adapter, final_latents, decode_batch_size)
    groups = torch.arange(num_prompts, device=device)
    return Rollouts(
        num_prompts=num_prompts,
        group_prompt=groups,
        group_step=torch.zeros_like(groups),
        images=images.view(num_prompts, num_generations, *images.shape[1:]),
        anchor_images=images[:0],
        anchor_latents=final_latents[:0],  # no anchors: nothing to log
        step_latents=torch.cat([step[2] for step in steps])[order],
        step_start=torch.cat([torch.full((len(step[1]),), step[0], device=device) for step in steps])[order],
        step_length=torch.ones(len(rows), dtype=torch.long, device=device),
        step_prompt=rows // num_generations,
        step_phase=phase,
        samples=torch.cat([step[3] for step in steps])[order].unsqueeze(1),
        log_probs=torch.cat([step[4] for step in steps])[order].unsqueeze(1),
        sample_group=(rows // num_generations).unsqueeze(1),
        sample_member=(rows % num_generations).unsqueeze(1),
        conditioning=conditioning,
        num_evaluations=num_evaluations,
        num_model_calls=num_calls,
        num_transformer_rows=num_evaluations * adapter.transformer_rows_per_evaluation,
    )
