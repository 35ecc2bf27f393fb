"""Training the testbed: a VAE on the synthetic images, then the FLUX transformer by flow matching on its latents.

Everything runs on the CPU in one thread from one seed, for a fixed number of steps, so the same seed, torch
version and machine give the same weights bit for bit (a wall-clock limit would not). Data comes from one
rendered pool: ``images_per_prompt`` jittered images of every training prompt.

Flow matching, in the convention of diffusers and of ``FluxAdapter.velocity``: with ``x0`` the normalized,
2x2-packed latent of an image and ``eps`` standard normal noise,

    x_sigma = (1 - sigma) * x0 + sigma * eps,      target velocity  v = eps - x0,

and the transformer is called with ``timestep = sigma`` (``FluxPipeline`` passes ``t / 1000`` with the
scheduler's ``t = 1000 * sigma``). ``sigma = shift * u / (1 + (shift - 1) * u)`` with ``u ~ U(0, 1)``: the
sampling schedule's own shift applied to a uniform draw, so the noise levels are trained in proportion to how
densely the shifted sampling schedule visits them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from trl_flow_egrpo.schedule import shift_sigmas

from .grammar import render_prompts
from .model import SHIFT

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """The testbed's training recipe; the defaults build the committed checkpoint."""

    seed: int = 0
    """Seeds the weights, the rendered pool and every random draw of training."""
    image_size: int = 32
    """Side of the square images, in pixels."""
    max_sequence_length: int = 16
    """T5 tokens of the prompt encoding (a two-object prompt has 12); sample with the same value."""
    images_per_prompt: int = 2
    """Jittered images rendered per training prompt for the pool."""
    vae_steps: int = 600
    """Optimizer steps of the VAE."""
    vae_batch_size: int = 32
    vae_learning_rate: float = 2e-3
    vae_kl_weight: float = 1e-6
    """Weight of the KL term (per latent element) against the per-pixel MSE: a light regularization that keeps
    the latent space smooth without blurring the reconstructions."""
    transformer_steps: int = 2500
    """Optimizer steps of the transformer."""
    transformer_batch_size: int = 64
    transformer_learning_rate: float = 1e-3
    warmup_steps: int = 100
    """Linear learning-rate warm-up of the transformer; the rate then decays linearly to 10% at the last step."""


@dataclass
class TrainingLog:
    """What a build measured: losses at a few steps and the time of each phase (wall clock and this process's
    CPU time; on a busy machine the wall clock grows, the CPU time much less)."""

    vae_losses: list[tuple[int, float]]
    transformer_losses: list[tuple[int, float]]
    seconds: dict[str, float]
    cpu_seconds: dict[str, float]


class PhaseTimer:
    """Records wall-clock and CPU seconds of named phases: ``with timer("vae"): ...``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self._name = None

    def __call__(self, name: str) -> PhaseTimer:
        self._name = name
        return self

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        wall, cpu = self._start
        self.seconds[self._name] = time.perf_counter() - wall
        self.cpu_seconds[self._name] = time.process_time() - cpu


def render_pool(prompts: list[str], images_per_prompt: int, size: int, generator: torch.Generator):
    """``images_per_prompt`` images of each prompt: ``(images [N, 3, size, size] in [0, 1], prompt_index [N])``,
    prompts in order, each prompt's images consecutive."""
    repeated = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    prompt_index = torch.arange(len(prompts)).repeat_interleave(images_per_prompt)
    return render_prompts(repeated, size, generator), prompt_index


def train_vae(vae, images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> list[tuple[int, float]]:
    """Train ``vae`` as an autoencoder on ``images`` (``[N, 3, H, W]`` in [0, 1]).

    Loss per batch: ``mean((decode(z) - x)^2) + kl_weight * mean(KL(q(z | x) || N(0, I)))`` with ``x`` the images
    in [-1, 1] and ``z`` a posterior sample. AdamW, constant learning rate. Returns ``(step, MSE)`` every 100
    steps and at the last.
    """
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate)
    losses = []
    for step in range(recipe.vae_steps):
        batch = images[torch.randint(len(images), (recipe.vae_batch_size,), generator=generator)] * 2 - 1
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        mse = (reconstruction - batch).pow(2).mean()
        kl_per_element = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + recipe.vae_kl_weight * kl_per_element
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            losses.append((step, mse.item()))
            logger.info("VAE step %d/%d: MSE %.4f", step + 1, recipe.vae_steps, mse.item())
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Posterior means ``[N, C, h, w]`` of ``images`` in [0, 1], in the VAE's raw (unnormalized) latent space."""
    return torch.cat(
        [vae.encode(images[i : i + batch_size] * 2 - 1).latent_dist.mode() for i in range(0, len(images), batch_size)]
    )


def latent_normalization(latents: torch.Tensor) -> tuple[float, float]:
    """FLUX's latent normalization from raw latents: ``shift_factor`` = their mean, ``scaling_factor`` = 1 / their
    standard deviation, so that ``(z - shift_factor) * scaling_factor`` has mean 0 and variance 1."""
    return latents.mean().item(), 1.0 / latents.std().item()


def pack(pipeline, latents: torch.Tensor) -> torch.Tensor:
    """``[N, C, h, w]`` latents as FLUX's 2x2-packed tokens ``[N, h/2 * w/2, 4C]``."""
    count, channels, height, width = latents.shape
    return pipeline._pack_latents(latents, count, channels, height, width)


@torch.no_grad()
def encode_prompt_table(pipeline, prompts: list[str], max_sequence_length: int, batch_size: int = 256):
    """The pipeline's encodings of ``prompts``: ``(prompt_embeds [P, L, D], pooled_prompt_embeds [P, D'])``."""
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        prompt_embeds, pooled_prompt_embeds, _ = pipeline.encode_prompt(
            prompt=prompts[i : i + batch_size], prompt_2=None, max_sequence_length=max_sequence_length
        )
        embeds.append(prompt_embeds)
        pooled.append(pooled_prompt_embeds)
    return torch.cat(embeds), torch.cat(pooled)


def sample_training_sigmas(batch_size: int, generator: torch.Generator, shift: float = SHIFT) -> torch.Tensor:
    """``sigma = shift * u / (1 + (shift - 1) * u)``, ``u ~ U(0, 1)``: noise levels in proportion to the shifted
    sampling schedule's density."""
    return shift_sigmas(torch.rand(batch_size, generator=generator), shift)


def flow_matching_loss(
    transformer,
    pipeline,
    clean: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
) -> torch.Tensor:
    """``mean((v_theta(x_sigma, sigma) - (noise - clean))^2)`` with ``x_sigma = (1 - sigma) clean + sigma noise``,
    on packed latents, the transformer called as ``FluxAdapter.velocity`` calls it (``timestep = sigma``)."""
    batch, tokens, _ = clean.shape
    side = int(tokens**0.5)
    image_ids = pipeline._prepare_latent_image_ids(batch, side, side, clean.device, clean.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, dtype=clean.dtype)
    noisy = (1 - sigmas[:, None, None]) * clean + sigmas[:, None, None] * noise
    velocity = transformer(
        hidden_states=noisy,
        timestep=sigmas,
        guidance=None,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    return (velocity - (noise - clean)).pow(2).mean()


def learning_rate_factor(step: int, recipe: Recipe) -> float:
    """Linear warm-up over ``warmup_steps``, then linear decay to 0.1 at the last step."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.transformer_steps - recipe.warmup_steps)
    return 1.0 - 0.9 * progress


def train_transformer(
    pipeline,
    clean: torch.Tensor,
    prompt_index: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
) -> list[tuple[int, float]]:
    """Train ``pipeline.transformer`` by flow matching on packed latents ``clean [N, tokens, 4C]`` whose prompts
    are rows ``prompt_index [N]`` of the prompt table. AdamW (no weight decay), gradient norm clipped at 1.
    Returns ``(step, loss)`` every 250 steps and at the last."""
    transformer = pipeline.transformer
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=recipe.transformer_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, recipe))
    losses = []
    for step in range(recipe.transformer_steps):
        rows = torch.randint(len(clean), (recipe.transformer_batch_size,), generator=generator)
        batch = clean[rows]
        noise = torch.randn(batch.shape, generator=generator)
        sigmas = sample_training_sigmas(len(rows), generator)
        prompts = prompt_index[rows]
        loss = flow_matching_loss(
            transformer, pipeline, batch, noise, sigmas, prompt_embeds[prompts], pooled_prompt_embeds[prompts]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == recipe.transformer_steps - 1:
            losses.append((step, loss.item()))
            logger.info(
                "transformer step %d/%d: flow-matching loss %.4f", step + 1, recipe.transformer_steps, loss.item()
            )
    transformer.eval()
    return losses
