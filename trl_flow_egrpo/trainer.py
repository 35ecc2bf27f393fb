"""``EGRPOTrainer``: E-GRPO for flow-matching text-to-image pipelines, on accelerate.

One iteration (Algorithm 1 of the paper, METHOD.md sections 4-6):

1. take ``prompts_per_device`` prompts per process;
2. sample the anchor trajectories and the branched rollouts of every merged step of the plan;
3. score the images with the reward functions; normalize rewards within each (prompt, step) group;
4. PPO-clip update of the policy on the one stochastic step of every rollout.

The trainer orchestrates; the math lives in :mod:`~trl_flow_egrpo.sde`, :mod:`~trl_flow_egrpo.merging`,
:mod:`~trl_flow_egrpo.advantages` and :mod:`~trl_flow_egrpo.loss`, and everything model-specific in
:mod:`~trl_flow_egrpo.adapters`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import acceleration, backends, checkpoints, quantization, tracking
from .adapters import get_adapter, select_rows
from .advantages import group_advantages, sum_advantages_into_targets
from .algorithms import build_strategy
from .checkpoints import TrainerState
from .config import EGRPOConfig, check_mixed_precision_on_device
from .data import as_prompt_dataset, check_source_images, iteration_prompt_indices, load_source_image, padded_shard
from .distributed import allow_mixed_precision_change, is_multiprocess_cpu_run
from .failures import propagate_failures
from .loss import (
    RatioNormalization,
    ema_update_,
    forward_noise,
    mean_drift,
    ppo_clip_loss,
    step_weights,
    velocity_kl,
)
from .metrics import rollout_metrics, sampling_cost_metrics, throughput_metrics, update_metrics
from .prompts import PromptEncoder
from .rollout import Rollouts, concat_rollouts, prompt_generators, sample_images
from .scoring import reward_parse_failures, score_images, unique_reward_names, validate_reward_fns
from .sde import sample_gaussian_step

logger = logging.getLogger(__name__)

EVAL_GRID = "eval_grid.png"


class EGRPOTrainer:
    """Fine-tune a flow-matching text-to-image pipeline with E-GRPO.

    Args:
        config: the run's :class:`~trl_flow_egrpo.EGRPOConfig`.
        pipeline: a diffusers pipeline (``FluxPipeline``; see ``trl_flow_egrpo.adapters.ADAPTERS``). Its
            transformer is trained in place (a LoRA is added to it unless ``config.use_peft`` is False).
        reward_fns: one reward callable or a list: ``fn(images, prompts, **columns)`` returning one float
            per image (``images``: float ``[B, 3, H, W]`` in [0, 1], or ``[B, F, 3, H, W]`` frames for a video
            pipeline, see docs/video.md; ``columns``: the dataset's other columns for those prompts). Weighted by
            ``config.reward_weights``.
        train_dataset: a ``datasets.Dataset`` (or any sized, indexable collection of dicts) with the
            prompts in ``config.prompt_column``, or simply a list of prompt strings.
        eval_dataset: optional prompts for evaluation (every ``config.eval_steps`` and :meth:`evaluate`).
        eval_reward_fns: rewards scored on evaluation samples only, never trained on: watch them to catch
            reward hacking (e.g. train on HPS, evaluate with PickScore and ImageReward).

    Example::

        from datasets import Dataset
        from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
        from trl_flow_egrpo.rewards import ColorReward
        from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

        config = EGRPOConfig(height=64, width=64, max_steps=10, mixed_precision="no")
        trainer = EGRPOTrainer(config, build_tiny_flux_pipeline(), [ColorReward()],
                               Dataset.from_dict({"prompt": ["a red apple", "a fire truck"]}))
        trainer.train()
    """

    def __init__(
        self,
        config: EGRPOConfig,
        pipeline,
        reward_fns: Callable | Sequence[Callable],
        train_dataset,
        eval_dataset=None,
        eval_reward_fns: Sequence[Callable] | None = None,
    ):
        self.config = config
        self.reward_fns = validate_reward_fns(reward_fns)
        self.eval_reward_fns = validate_reward_fns(eval_reward_fns) if eval_reward_fns else []
        self.reward_names = unique_reward_names(self.reward_fns)
        self.eval_reward_names = unique_reward_names(self.reward_fns + self.eval_reward_fns)[len(self.reward_fns) :]
        if config.reward_weights is not None and len(config.reward_weights) != len(self.reward_fns):
            raise ValueError(
                f"reward_weights has {len(config.reward_weights)} values for {len(self.reward_fns)} "
                "reward functions: give one weight per reward function."
            )
        self.reward_weights = torch.tensor(config.reward_weights or [1.0] * len(self.reward_fns))
        self.train_dataset = as_prompt_dataset(train_dataset, config.prompt_column, "train_dataset")
        self.eval_dataset = (
            None if eval_dataset is None else as_prompt_dataset(eval_dataset, config.prompt_column, "eval_dataset")
        )
        if config.eval_steps and self.eval_dataset is None:
            raise ValueError(
                f"eval_steps={config.eval_steps} but no eval_dataset was given: pass eval_dataset to the "
                "trainer, or set eval_steps=0."
            )
        self.adapter = get_adapter(
            pipeline,
            height=config.height,
            width=config.width,
            guidance_scale=config.guidance_scale,
            max_sequence_length=config.max_sequence_length,
            negative_prompt=config.negative_prompt,
            num_frames=config.num_frames,
        )
        # FLUX.1's pipeline has no negative pass: a negative prompt would be silently ignored.
        if config.negative_prompt and not self.adapter.supports_negative_prompt:
            raise ValueError(
                f"negative_prompt={config.negative_prompt!r} is not allowed with {type(pipeline).__name__}: "
                f"{type(self.adapter).__name__} samples without a negative-prompt pass (guidance-distilled: "
                "guidance_scale goes to a guidance embedding, one transformer pass per step), so the prompt would be "
                "silently ignored. Set negative_prompt to '' (EGRPOConfig.negative_prompt); negative prompts work "
                "with classifier-free guidance (guidance_scale > 1) on SD3, FLUX.2 [klein] base, Qwen-Image, "
                "Z-Image and Wan."
            )
        if config.negative_prompt and not getattr(self.adapter, "do_classifier_free_guidance", True):
            raise ValueError(
                f"negative_prompt={config.negative_prompt!r} would never be used: classifier-free guidance is off "
                f"for {type(pipeline).__name__} at guidance_scale={self.adapter.guidance_scale}, so there is no "
                "negative-prompt pass. Raise guidance_scale to turn guidance on (SD3, Qwen-Image and Wan: > 1; "
                "Z-Image: > 0), or set negative_prompt to ''."
            )
        if self.adapter.edits_images:  # a missing or unreadable source image fails here, not mid-run
            pipeline_name = type(pipeline).__name__
            check_source_images(self.train_dataset, config.image_column, "train_dataset", pipeline_name)
            if self.eval_dataset is not None:
                check_source_images(self.eval_dataset, config.image_column, "eval_dataset", pipeline_name)
        self.pipeline = pipeline

        allow_mixed_precision_change(config.mixed_precision)  # a second trainer in a notebook
        self.accelerator = Accelerator(
            cpu=is_multiprocess_cpu_run(),
            mixed_precision=config.mixed_precision,
            log_with=tracking.available_trackers(config.report_to),
            project_config=ProjectConfiguration(
                project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs")
            ),
            # The schedule counts optimizer steps, which all processes take together. By default accelerate
            # steps a prepared scheduler num_processes times per call (it assumes per-process dataloader
            # batches); split_batches makes it one step per optimizer step, still skipping steps the optimizer
            # skipped (fp16 overflow). No dataloader is prepared, so it changes nothing else.
            dataloader_config=DataLoaderConfiguration(split_batches=True),
        )
        check_mixed_precision_on_device(config.mixed_precision, self.accelerator.device.type)
        # Fail before any model work when the result could not be pushed at the end.
        self.hub_repo_id = self._hub_preflight() if config.push_to_hub else None
        set_seed(config.seed, device_specific=True)
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True

        self.schedule = self.adapter.schedule(config.num_inference_steps, config.shift)
        self.strategy = build_strategy(config, self.schedule)
        if self.strategy.keeps_old_policy and (
            backends.is_fsdp(self.accelerator) or backends.is_deepspeed(self.accelerator)
        ):
            raise ValueError(
                f"algorithm={config.algorithm!r} samples with an EMA copy of the trained parameters, which this "
                "trainer keeps per process and cannot keep for parameters sharded by FSDP or DeepSpeed. Launch "
                "with DDP (a plain `accelerate launch`) or one process, or use another algorithm."
            )

        self.model, self.reference_model = self._prepare_transformer()
        self.speed_switches = acceleration.apply_speed_switches(self.model, config)
        self.flops_per_row: int | None = None  # counted at the first iteration that logs MFU
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = acceleration.build_optimizer(trainable, config)
        if config.optimizer == "adamw_8bit":  # 2 B of optimizer state per trained parameter instead of 8 B
            self.optimizer = quantization.adamw_8bit(trainable, like=self.optimizer)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * self.optimizer_steps_per_iteration,
        )
        if backends.is_deepspeed(self.accelerator):
            steps_per_update = self.strategy.trained_steps_per_phase(config.prompts_per_device) * (
                1 if config.optimizer_step == "active_step" else self.strategy.num_phases
            )
            backends.configure_deepspeed(
                self.accelerator,
                config.per_device_train_batch_size,
                backends.micro_batches_per_optimizer_step(steps_per_update, config.per_device_train_batch_size),
                config.max_grad_norm,
            )
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        # Under FSDP and DeepSpeed, save_state writes every process's shard of the model itself.
        if config.use_peft and not (backends.is_fsdp(self.accelerator) or backends.is_deepspeed(self.accelerator)):
            checkpoints.register_trainable_params_hooks(self.accelerator)

        self.prompt_encoder = PromptEncoder(
            self.adapter, self.accelerator.device, config.offload_text_encoders, config.prompt_cache_dir
        )
        # Rollout noise has its own generator (per process, on the CPU so that runs reproduce across devices).
        self.generator = torch.Generator("cpu").manual_seed(config.seed + self.accelerator.process_index)
        self.state = TrainerState()
        self.num_trainable_parameters = sum(p.numel() for p in trainable)
        # DiffusionNFT samples with an EMA "old" copy of the trained parameters, equal to them at the start.
        self.old_policy = self._trainable_parameters(clone=True) if self.strategy.keeps_old_policy else None

    # ------------------------------------------------------------------ setup

    def _prepare_transformer(self):
        """Freeze what is not trained, add the LoRA, place the modules; returns (transformer, frozen copy or None).

        Under FSDP the transformer stays where it was loaded (the CPU): ``prepare`` moves only each process's
        shard to its GPU, so the whole model (in float32 when fully fine-tuning: 48 GB for FLUX.1-dev) is never
        built on a GPU. With ``fsdp_cpu_ram_efficient_loading`` the non-main processes' weights are placeholders
        that ``prepare`` replaces with the main process's (:func:`backends.weights_arrive_from_main_process`).
        """
        config, adapter, accelerator = self.config, self.adapter, self.accelerator
        device = accelerator.device
        shard_later = backends.is_fsdp(accelerator)
        placeholder = backends.weights_arrive_from_main_process(accelerator)
        for module in adapter.frozen_modules:
            module.requires_grad_(False).eval()
            module.to(device)
        transformer = adapter.transformer
        # A quantized base reaches the device layer by layer, quantized: its bf16 weights need not fit there.
        if not shard_later and config.quantization is None:
            transformer.to(device)
        reference = None
        if config.use_peft:
            from peft import LoraConfig

            transformer.requires_grad_(False)
            # Same random LoRA on every process, whatever their number: FSDP shards each process's own copy.
            cuda = [transformer.device.index or 0] if transformer.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(config.seed)
                transformer.add_adapter(
                    LoraConfig(
                        r=config.lora_r,
                        lora_alpha=config.lora_alpha,
                        lora_dropout=config.lora_dropout,
                        init_lora_weights="gaussian",
                        target_modules=list(config.lora_target_modules or adapter.default_lora_target_modules),
                    )
                )
            if config.quantization is not None:  # after the LoRA: peft then wraps plain linear layers
                quantization.quantize_base_weights(
                    transformer,
                    config.quantization,
                    device,
                    "fsdp" if shard_later else "deepspeed" if backends.is_deepspeed(accelerator) else None,
                )
        elif self.strategy.beta > 0:
            if placeholder:
                raise ValueError(
                    "beta > 0 with full fine-tuning needs a frozen copy of the real weights on every "
                    "process, but with fsdp_cpu_ram_efficient_loading only the main process loads "
                    "them. Set fsdp_cpu_ram_efficient_loading: false (and fsdp_sync_module_states: "
                    "false) in the accelerate config, train a LoRA (use_peft=True), or set beta=0."
                )
            reference = copy.deepcopy(transformer).requires_grad_(False).eval().to(device)
        # Trainable parameters live in float32 whatever the base dtype (mixed precision autocasts compute).
        for parameter in transformer.parameters():
            if parameter.requires_grad and parameter.dtype != torch.float32:
                # A placeholder's value is never read: allocate float32 without touching (and paging in) it.
                parameter.data = (
                    torch.empty_like(parameter.data, dtype=torch.float32)
                    if placeholder
                    else parameter.data.to(torch.float32)
                )
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        return transformer.eval(), reference

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps in one iteration (per ``optimizer_step`` and ``num_inner_epochs``)."""
        per_epoch = self.strategy.num_phases if self.config.optimizer_step == "active_step" else 1
        return per_epoch * self.config.num_inner_epochs

    @property
    def merge_plan(self) -> list:
        """E-GRPO's merge plan (:func:`~trl_flow_egrpo.plan_merges`); empty for the other algorithms."""
        return getattr(self.strategy, "merge_plan", [])

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The trained transformer without distributed wrappers."""
        return self.accelerator.unwrap_model(self.model)

    def _trainable_parameters(self, clone: bool = False) -> dict[str, torch.Tensor]:
        """The trained parameters by name (detached copies with ``clone``)."""
        return {
            name: parameter.detach().clone() if clone else parameter
            for name, parameter in self.unwrapped_model.named_parameters()
            if parameter.requires_grad
        }

    @contextlib.contextmanager
    def _sampling_policy(self):
        """The policy the strategy samples with: the current one, or its old policy swapped into the trained
        parameters (and the current values restored after)."""
        if self.old_policy is None:
            yield
            return
        parameters = self._trainable_parameters()
        current = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(self.old_policy[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in parameters.items():
                    parameter.copy_(current[name])

    # ------------------------------------------------------------------ data

    def iteration_rows(self, iteration: int) -> list[dict]:
        """This process's dataset rows for ``iteration`` (:func:`~trl_flow_egrpo.data.iteration_prompt_indices`)."""
        config, accelerator = self.config, self.accelerator
        indices = iteration_prompt_indices(
            iteration,
            len(self.train_dataset),
            config.prompts_per_device,
            accelerator.process_index,
            accelerator.num_processes,
            config.seed,
            config.shuffle_dataset,
        )
        return self.with_source_images([self.train_dataset[i] for i in indices])

    def with_source_images(self, rows: list[dict]) -> list[dict]:
        """``rows`` with their source images loaded as RGB PIL images (``config.image_column``), for an
        image-editing family; the rows as they are otherwise. Rewards receive these images in that column."""
        column = self.config.image_column
        if not self.adapter.edits_images:
            return rows
        return [{**row, column: load_source_image(row[column])} for row in rows]

    def source_images(self, rows: list[dict]) -> list | None:
        """The source images of rows from :meth:`with_source_images` (None for a text-to-image family)."""
        return [row[self.config.image_column] for row in rows] if self.adapter.edits_images else None

    # ------------------------------------------------------------------ training loop

    def train(self) -> TrainerState:
        """Run E-GRPO for ``config.max_steps`` iterations (resuming first if configured).

        With several processes, an exception on one stops all of them within about a second (instead of the
        others waiting in their next collective until its timeout): the failing process raises it, the others
        exit with code 1 naming the failing rank and its error (:func:`~trl_flow_egrpo.failures.propagate_failures`).
        """
        with propagate_failures(self.accelerator):
            return self._train()

    def _train(self) -> TrainerState:
        """The training loop of :meth:`train`."""
        config, accelerator = self.config, self.accelerator
        if config.resume_from_checkpoint not in (None, "", "false", "False"):
            self.load_checkpoint(config.resume_from_checkpoint)
        else:  # an earlier run's later checkpoints in output_dir would otherwise outlive (and outrank) this run's
            if accelerator.is_main_process:
                checkpoints.set_aside_later_checkpoints(config.output_dir, self.state.iteration)
            accelerator.wait_for_everyone()
        accelerator.init_trackers(
            config.tracker_project_name,
            config=tracking.flat_config(config.to_dict()),
            init_kwargs=tracking.tracker_init_kwargs(config.run_name, config.output_dir),
        )
        self._log_start()

        progress = tqdm(
            total=config.max_steps,
            initial=self.state.iteration,
            desc="E-GRPO",
            disable=config.disable_tqdm or not accelerator.is_local_main_process,
        )
        while self.state.iteration < config.max_steps:
            metrics = self.step()
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward/weighted_mean']:.4f}")
            if accelerator.is_main_process and self.state.iteration % config.logging_steps == 0:
                progress.write(tracking.summary_line(metrics, config.max_steps))
            if config.eval_steps and self.state.iteration % config.eval_steps == 0:
                self.evaluate()
            if config.save_steps and self.state.iteration % config.save_steps == 0:
                checkpoint = self.save_checkpoint()
                if config.push_to_hub and config.hub_strategy == "every_save":
                    self.push_to_hub(f"E-GRPO iteration {self.state.iteration}", checkpoint=checkpoint)
        progress.close()
        if config.push_to_hub:
            self.push_to_hub()
        accelerator.wait_for_everyone()
        # Close the trackers but keep the process group: save_model / push_to_hub may follow train().
        for tracker in accelerator.trackers:
            tracker.finish()
        return self.state

    def step(self) -> dict[str, float]:
        """One E-GRPO iteration: sample, score, update. Returns (and logs) the iteration's metrics."""
        config = self.config
        rows = self.iteration_rows(self.state.iteration)
        peaks = acceleration.PhasePeakMemory(self.accelerator.device)
        if config.async_rewards:
            with peaks("sampling_and_rewards"):
                rollouts, rewards, anchor_rewards, timings = self._sample_and_score_overlapped(rows)
        else:
            start = time.perf_counter()
            with peaks("sampling"):
                rollouts = self.generate([row[config.prompt_column] for row in rows], self.source_images(rows))
            sampling_seconds = time.perf_counter() - start
            with peaks("rewards"):
                rewards, anchor_rewards = self.score(rollouts, rows)
            timings = {
                "time/sampling": sampling_seconds,
                "time/rewards": time.perf_counter() - start - sampling_seconds,
            }

        advantages = self._advantages(rewards)
        start = time.perf_counter()
        with peaks("update"), self.adapter.phase():  # the phase: the transformer's dtype is read once for the update
            # E-GRPO's completion granularities: each stride's groups add their advantages to the trained group.
            update_stats = self.update(rollouts, sum_advantages_into_targets(advantages, rollouts.advantage_target))
        update_seconds = time.perf_counter() - start
        if self.old_policy is not None:  # after the iteration's optimizer steps, as the official DiffusionNFT
            steps = (self.state.iteration + 1) * self.optimizer_steps_per_iteration
            ema_update_(self.old_policy, self._trainable_parameters(), self.strategy.old_policy_decay(steps))

        self.state.iteration += 1
        metrics = self._metrics(rollouts, rewards, anchor_rewards, advantages, update_stats)
        metrics.update(
            {
                **timings,
                "time/update": update_seconds,
                "iteration": self.state.iteration,
                **peaks.values,
                **self._throughput(rollouts, timings["time/sampling"], update_seconds),
            }
        )
        self.state.log_history.append(metrics)
        if self.state.iteration % config.logging_steps == 0:
            self.accelerator.log(metrics, step=self.state.iteration)
        return metrics

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """This process's group advantages (:func:`~trl_flow_egrpo.advantages.group_advantages`). With
        ``advantage_std="batch"`` the std is taken over the rewards of all processes (Flow-GRPO's global std),
        so the rewards are gathered first and this process's groups taken back."""
        config, accelerator = self.config, self.accelerator
        std = self.strategy.advantage_std
        if std == "batch":
            all_rewards = accelerator.gather(rewards.to(accelerator.device))
        else:
            all_rewards = rewards
        advantages = group_advantages(
            all_rewards,
            self.reward_weights,
            config.reward_aggregation,
            config.advantage_clip,
            config.advantage_eps,
            std=std,
        )
        if std == "batch":  # gather concatenates the processes' groups in process order
            first = accelerator.process_index * len(rewards)
            advantages = advantages[first : first + len(rewards)].to(rewards.device)
        return advantages

    def _sample_and_score_overlapped(self, rows: list[dict]):
        """Sample prompt by prompt; each prompt's images are scored in a worker thread while the next prompt
        is sampled. ``time/rewards`` is then only the scoring time that sampling did not hide."""
        start = time.perf_counter()
        parts, futures = [], []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for i in range(len(rows)):
                parts.append(self.generate([rows[i][self.config.prompt_column]], self.source_images(rows[i : i + 1])))
                futures.append(pool.submit(self.score, parts[-1], rows[i : i + 1]))
            sampling_seconds = time.perf_counter() - start
            scores = [future.result() for future in futures]
        timings = {"time/sampling": sampling_seconds, "time/rewards": time.perf_counter() - start - sampling_seconds}
        return (
            concat_rollouts(parts),
            torch.cat([branch for branch, _ in scores]),
            torch.cat([anchor for _, anchor in scores]),
            timings,
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], images: list | None = None) -> Rollouts:
        """Sample this process's rollouts of ``prompts`` with the sampling policy (the current one, or the
        strategy's old policy: :meth:`_sampling_policy`), ``config.algorithm``'s way;
        ``images``: each prompt's source image (RGB PIL images), for an image-editing family."""
        conditioning = self.prompt_encoder(prompts, self._checked_images(prompts, images))
        generators = prompt_generators(self.generator, len(prompts))
        self.model.eval()
        with self.accelerator.autocast(), self._sampling_policy():
            return self.strategy.sample(
                self.adapter, self.unwrapped_model, conditioning, generators, self.state.iteration
            )

    @torch.no_grad()
    def sample_images(
        self, prompts: list[str], seed: int | Sequence[int] = 0, images: list | None = None
    ) -> torch.Tensor:
        """Deterministic (ODE) images of the current policy, ``[B, 3, H, W]`` in [0, 1] (videos: ``[B, F, 3, H, W]``).

        Prompt ``i`` starts from noise seeded by ``seed + i`` (or ``seed[i]`` given a list), so the same
        prompts and seeds give the same noise: before/after comparisons are paired. An image-editing family
        needs ``images``, each prompt's source image (anything the dataset's image column may hold).
        """
        config = self.config
        images = self._checked_images(prompts, images and [load_source_image(image) for image in images])
        encode = self.prompt_encoder if images is None else (lambda texts: self.prompt_encoder(texts, images))
        seeds = list(seed) if isinstance(seed, Sequence) else [seed + i for i in range(len(prompts))]
        self.model.eval()
        with self.accelerator.autocast():
            return sample_images(
                self.adapter,
                self.unwrapped_model,
                self.schedule,
                prompts,
                seeds,
                config.rollout_batch_size,
                config.decode_batch_size,
                encode,
            )

    def evaluate(self) -> dict[str, float]:
        """Score deterministic samples of the eval prompts with the training and evaluation rewards.

        Eval prompt ``i`` always starts from the noise of seed ``eval_seed + i``, so evaluations along a run
        compare the same images. Prompts are sharded across processes and the scores gathered. Metrics
        (``eval/<reward>/mean``, ``.../std``) and an image grid (also saved to ``output_dir/eval_grid.png``)
        go to the trackers.
        """
        config, accelerator = self.config, self.accelerator
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset: pass one to EGRPOTrainer(..., eval_dataset=...).")
        size = len(self.eval_dataset)
        positions = padded_shard(size, accelerator.process_index, accelerator.num_processes)
        rows = self.with_source_images([self.eval_dataset[i] for i in positions])
        images = self.sample_images(
            [row[config.prompt_column] for row in rows],
            [config.eval_seed + i for i in positions],
            self.source_images(rows),
        )
        names = self.reward_names + self.eval_reward_names
        scores = score_images(self.reward_fns + self.eval_reward_fns, names, images, rows, config.prompt_column)
        scores = accelerator.gather(scores.to(accelerator.device))[:size]
        for reward_fn in self.eval_reward_fns:  # off the GPU until the next evaluation (model rewards)
            if callable(getattr(reward_fn, "offload", None)):
                reward_fn.offload()
        metrics = {}
        for r, name in enumerate(names):
            metrics[f"eval/{name}/mean"] = scores[:, r].mean().item()
            metrics[f"eval/{name}/std"] = scores[:, r].std().item() if size > 1 else 0.0
        grid_images = accelerator.gather(images.contiguous())[: min(size, config.eval_grid_images)]
        if accelerator.is_main_process:
            tracking.log_image_grid(
                accelerator, grid_images, os.path.join(config.output_dir, EVAL_GRID), self.state.iteration
            )
        accelerator.log(metrics, step=self.state.iteration)
        self.state.eval_history.append({"iteration": self.state.iteration, **metrics})
        return metrics

    def _checked_images(self, prompts: list[str], images: list | None) -> list | None:
        """``images`` when they fit the family: one per prompt for an image-editing family, None otherwise."""
        pipeline = type(self.pipeline).__name__
        if not self.adapter.edits_images:
            if images is not None:
                raise ValueError(f"{pipeline} generates from text alone: pass no source images (images=None).")
            return None
        if images is None or len(images) != len(prompts):
            given = "none" if images is None else len(images)
            raise ValueError(
                f"{pipeline} edits a source image per prompt: pass images=[...], one per prompt ({len(prompts)} "
                f"prompts, {given} images)."
            )
        return images

    def score(self, rollouts: Rollouts, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of every rollout ``[num_groups, G, num_rewards]`` and of the anchors ``[P or 0, num_rewards]``.

        All images of the iteration (branches, then anchors) go to each reward in one call.
        """
        num_groups, num_generations = rollouts.images.shape[:2]
        images = torch.cat([rollouts.images.flatten(0, 1), rollouts.anchor_images])
        prompt_of_image = torch.cat(
            [rollouts.group_prompt.cpu().repeat_interleave(num_generations), torch.arange(len(rollouts.anchor_images))]
        ).tolist()
        scores = score_images(
            self.reward_fns, self.reward_names, images, [rows[i] for i in prompt_of_image], self.config.prompt_column
        )
        branch_scores = scores[: num_groups * num_generations].view(num_groups, num_generations, -1)
        return branch_scores, scores[num_groups * num_generations :]

    def update(self, rollouts: Rollouts, advantages: torch.Tensor) -> dict[str, float]:
        """PPO-clip updates on the iteration's rollouts. Returns the update's statistics."""
        config, accelerator = self.config, self.accelerator
        advantages = advantages.to(accelerator.device)
        # The trained steps of each optimizer step (a phase of the strategy's, or all of them).
        if config.optimizer_step == "active_step":
            phases = [(rollouts.step_phase == i).nonzero().flatten() for i in range(self.strategy.num_phases)]
            # MixGRPO's window is shorter near the end of the schedule: its missing phases take no step.
            phases = [steps for steps in phases if len(steps)]
        else:
            phases = [torch.arange(len(rollouts.step_start), device=accelerator.device)]

        stats: dict[str, list[torch.Tensor]] = {
            "ratio": [],
            "clipped": [],
            "approx_kl": [],
            "loss": [],
            "kl": [],
            "grad_norm": [],
        }
        on_policy_deviation = []
        on_policy = True
        self.model.train()
        # GRPO-Guard's ratio normalization needs each trained step's mean under the sampling policy: the rollouts
        # do not keep it, so the pre-pass records it from the training path before any optimizer step.
        old_means = torch.empty_like(rollouts.step_latents) if config.ratio_normalization else None
        # A forward-process strategy's old log-probabilities come from the velocities the sampler recorded.
        recompute_seconds = (
            self._recompute_log_probs(rollouts, phases, old_means)
            if (config.compile_transformer or config.ratio_normalization) and not self.strategy.trains_forward_process
            else None
        )
        for _ in range(config.num_inner_epochs):
            for steps in phases:
                micro_batches = steps.split(config.per_device_train_batch_size)
                for i, micro_batch in enumerate(micro_batches):
                    boundary = i == len(micro_batches) - 1
                    with backends.accumulation_context(accelerator, self.model, boundary):
                        output, kl = self._policy_loss(rollouts, advantages, micro_batch, old_means)
                        beta = self.strategy.beta
                        loss = output.loss + beta * kl.mean() if beta > 0 else output.loss
                        accelerator.backward(loss * len(micro_batch) / len(steps))
                    stats["ratio"].append(output.ratio)
                    stats["clipped"].append(output.clipped.float())
                    stats["approx_kl"].append(output.approx_kl.view(1))
                    stats["loss"].append(loss.detach().view(1))
                    stats["kl"].append(kl.detach())
                    if on_policy:
                        on_policy_deviation.append((output.ratio - 1).abs().max().view(1))
                max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
                grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
                stats["grad_norm"].append(backends.grad_norm_value(grad_norm))
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                on_policy = False
        self.model.eval()

        gathered = {
            name: accelerator.gather(torch.cat(values).float().to(accelerator.device))
            for name, values in stats.items()
            if values
        }
        gathered["on_policy_deviation"] = accelerator.gather(torch.cat(on_policy_deviation).to(accelerator.device))
        if self.strategy.beta == 0:
            gathered.pop("kl")
        metrics = update_metrics(**gathered)
        metrics["learning_rate"] = self.lr_scheduler.get_last_lr()[0]
        if recompute_seconds is not None:
            metrics["time/recompute_log_probs"] = recompute_seconds
        # With an old policy that lags the current one (DiffusionNFT), the first step's ratios are not on-policy.
        lagging = self.old_policy is not None and self.state.iteration > 0
        if (
            metrics["ratio/on_policy_max_abs_dev"] > 0.1 * config.clip_range
            and accelerator.is_main_process
            and not lagging
        ):
            # Sampling and training compute different log-probs for the same policy: the clip then acts on
            # numerical noise instead of policy change (METHOD.md section 6).
            logger.warning(
                "On-policy ratios deviate from 1 by up to %.2e (clip_range %.0e): sampling and training "
                "numerics differ (dtype, batch composition). See docs/troubleshooting.md.",
                metrics["ratio/on_policy_max_abs_dev"],
                config.clip_range,
            )
        return metrics

    def _recompute_log_probs(
        self, rollouts: Rollouts, phases: list[torch.Tensor], old_means: torch.Tensor | None = None
    ) -> float:
        """Replace the sampling-time log-probabilities by the training path's, before any optimizer step, and
        write the trained steps' Gaussian means into ``old_means`` (``[num_steps, ...]``) when given (ratio
        normalization); returns the seconds it took.

        Compiled sampling (no grad) and the compiled update (grad) run different graphs whose bf16 numerics
        differ (measured on CPU: on-policy max |r - 1| up to 7e-5); evaluated with the update's own graph and
        micro-batches, the first optimizer step's ratios are 1 again. Costs one forward (no backward) per
        trained step: about a third of the update.
        """
        start = time.perf_counter()
        for steps in phases:
            for micro_batch in steps.split(self.config.per_device_train_batch_size):
                # Grad mode on: the update's graph. The unwrapped model: a forward of the DDP wrapper expects
                # its backward. Nothing is kept, so the activations are freed at once.
                log_prob, mean, _ = self._step_log_probs(rollouts, micro_batch, self.unwrapped_model)
                rollouts.log_probs[micro_batch] = log_prob.detach().view(len(micro_batch), -1)
                if old_means is not None:
                    old_means[micro_batch] = mean.detach().to(old_means.dtype)
        return time.perf_counter() - start

    def _step_inputs(self, rollouts: Rollouts, steps: torch.Tensor):
        """The trained steps' ``(latents, timesteps, conditioning, starts, lengths)``."""
        starts, lengths = rollouts.step_start[steps], rollouts.step_length[steps]
        latents = rollouts.step_latents[steps]
        timesteps = self.schedule.timesteps.to(latents.device)[starts]
        return latents, timesteps, select_rows(rollouts.conditioning, rollouts.step_prompt[steps]), starts, lengths

    def _step_log_probs(self, rollouts: Rollouts, steps: torch.Tensor, model: torch.nn.Module):
        """Log-probabilities ``[len(steps) * K]`` of the samples of the trained steps ``steps`` under ``model``
        (one forward per step, shared by its ``K`` samples), with the steps' Gaussian mean and std."""
        latents, timesteps, conditioning, starts, lengths = self._step_inputs(rollouts, steps)
        with self.accelerator.autocast():
            velocity = self.adapter.velocity(model, latents, timesteps, conditioning)
        mean, std = self.strategy.step_distribution(latents, velocity, starts, lengths)
        num_samples = rollouts.samples.shape[1]
        step = sample_gaussian_step(
            mean.repeat_interleave(num_samples, dim=0),
            std.repeat_interleave(num_samples),
            sample=rollouts.samples[steps].flatten(0, 1),
        )
        return step.log_prob, mean, std

    def _policy_loss(
        self, rollouts: Rollouts, advantages: torch.Tensor, steps: torch.Tensor, old_means: torch.Tensor | None = None
    ):
        """PPO-clip loss of the trained steps ``steps``: one forward per step, shared by its ``K`` samples.
        ``old_means``: every trained step's mean at sampling, for GRPO-Guard's ratio normalization (None: off).
        A forward-process strategy's loss instead: :meth:`_forward_process_loss`."""
        config, adapter, strategy = self.config, self.adapter, self.strategy
        if strategy.trains_forward_process:
            return self._forward_process_loss(rollouts, advantages, steps)
        log_prob, mean, std = self._step_log_probs(rollouts, steps, self.model)
        sample_advantages = advantages[rollouts.sample_group[steps], rollouts.sample_member[steps]].flatten()
        num_samples = rollouts.samples.shape[1]  # a step's K samples share its mean, std and weight
        normalization = weights = None
        if old_means is not None:
            normalization = RatioNormalization(
                mean_drift(mean, old_means[steps]).repeat_interleave(num_samples), std.repeat_interleave(num_samples)
            )
        if config.step_reweighting:
            sigmas = self.schedule.sigmas.to(log_prob.device)
            weights = step_weights(sigmas, rollouts.step_start[steps], rollouts.step_length[steps])
            weights = weights.repeat_interleave(num_samples)
        output = ppo_clip_loss(
            log_prob, rollouts.log_probs[steps].flatten(), sample_advantages, config.clip_range, normalization, weights
        )
        kl = torch.zeros(len(steps), device=log_prob.device)
        if strategy.beta > 0:
            latents, timesteps, conditioning, starts, lengths = self._step_inputs(rollouts, steps)
            with torch.no_grad(), self.accelerator.autocast(), self._reference_model() as reference:
                reference_velocity = adapter.velocity(reference, latents, timesteps, conditioning)
            reference_mean, _ = strategy.step_distribution(latents, reference_velocity, starts, lengths)
            kl = strategy.kl_to_reference(mean, reference_mean, std, starts, lengths)
        return output, kl

    def _forward_process_loss(self, rollouts: Rollouts, advantages: torch.Tensor, steps: torch.Tensor):
        """DiffusionNFT / AWM: the strategy's loss of the trained samples ``steps``, at their forward-noised clean
        samples (one forward each), and the velocity KL to the frozen base model (zeros when ``beta`` is 0)."""
        strategy = self.strategy
        clean, noise, starts = rollouts.step_latents[steps], rollouts.samples[steps, 0], rollouts.step_start[steps]
        sigma = self.schedule.sigmas.to(clean.device)[starts]
        noisy = forward_noise(clean, noise, sigma)  # the sampler's x_t, recomputed identically
        timesteps = self.schedule.timesteps.to(clean.device)[starts]
        conditioning = select_rows(rollouts.conditioning, rollouts.step_prompt[steps])
        with self.accelerator.autocast():
            velocity = self.adapter.velocity(self.model, noisy, timesteps, conditioning)
        sample_advantages = advantages[rollouts.sample_group[steps], rollouts.sample_member[steps]].flatten()
        output = strategy.forward_process_loss(
            velocity, rollouts.step_velocity[steps], noisy, clean, noise, sigma, sample_advantages
        )
        kl = torch.zeros(len(steps), device=velocity.device)
        if strategy.beta > 0:
            with torch.no_grad(), self.accelerator.autocast(), self._reference_model() as reference:
                reference_velocity = self.adapter.velocity(reference, noisy, timesteps, conditioning)
            kl = velocity_kl(velocity, reference_velocity)
        return output, kl

    @contextlib.contextmanager
    def _reference_model(self):
        """The frozen base model: the LoRA disabled, or the frozen copy when fully fine-tuning."""
        if self.reference_model is not None:
            yield self.reference_model
            return
        model = self.unwrapped_model
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()

    # ------------------------------------------------------------------ metrics and logging

    def _metrics(self, rollouts: Rollouts, rewards, anchor_rewards, advantages, update_stats) -> dict[str, float]:
        """The iteration's metrics over all processes (:func:`~trl_flow_egrpo.metrics.rollout_metrics`)."""
        device = self.accelerator.device

        def gather(tensor):
            return self.accelerator.gather(tensor.to(device))

        all_rewards = gather(rewards)  # [groups of all processes, G, R]
        metrics = rollout_metrics(
            all_rewards,
            gather(anchor_rewards),
            gather(rollouts.group_step),
            gather(advantages),
            self.reward_weights,
            self.reward_names,
            self.strategy.group_labels,
        )
        metrics.update(
            sampling_cost_metrics(
                gather(torch.tensor([rollouts.num_evaluations])).sum().item(),
                gather(torch.tensor([rollouts.num_transformer_rows])).sum().item(),
                all_rewards.shape[0] * all_rewards.shape[1],
            )
        )
        metrics["transformer_calls"] = rollouts.num_model_calls
        failures = reward_parse_failures(self.reward_fns, self.reward_names)
        if failures:  # summed over the processes: each process's reward objects count their own replies
            totals = gather(torch.tensor(list(failures.values()))).view(-1, len(failures)).sum(0)
            for name, total in zip(failures, totals, strict=True):
                metrics[f"reward/{name}/parse_failures"] = int(total)
        metrics.update(update_stats)
        return metrics

    def _throughput(self, rollouts: Rollouts, sampling_seconds: float, update_seconds: float) -> dict[str, float]:
        """This process's transformer rows per second in sampling and update, and the sampling MFU where the
        device's peak is known (:func:`~trl_flow_egrpo.metrics.throughput_metrics`). Rows are the transformer's
        forward-batch rows (two per trajectory under classifier-free guidance); the update forwards every trained
        step once per inner epoch."""
        peak = acceleration.peak_tflops(self.accelerator.device, self.config.peak_tflops)
        if peak and self.flops_per_row is None:
            first = torch.tensor([0], device=rollouts.step_start.device)
            self.flops_per_row = acceleration.transformer_flops_per_row(
                self.adapter,
                self.unwrapped_model,
                rollouts.step_latents[first],
                self.schedule.timesteps.to(first.device)[rollouts.step_start[first]],
                select_rows(rollouts.conditioning, rollouts.step_prompt[first]),
            )
        update_rows = (
            len(rollouts.step_start) * self.config.num_inner_epochs * self.adapter.transformer_rows_per_evaluation
        )
        return throughput_metrics(
            rollouts.num_transformer_rows, sampling_seconds, update_rows, update_seconds, self.flops_per_row, peak
        )

    def _log_start(self):
        if self.accelerator.is_main_process:
            logger.info(self.strategy.describe())
            logger.info(
                "Per prompt: %d rollouts, %d trajectory evaluations (%d transformer rows); %d trainable parameters; "
                "%d process(es).",
                self.config.num_generations * max(1, len(self.strategy.group_labels)),
                self.evaluations_per_prompt(),
                self.evaluations_per_prompt() * self.adapter.transformer_rows_per_evaluation,
                self.num_trainable_parameters,
                self.accelerator.num_processes,
            )
            logger.info("Speed switches: %s.", "; ".join(self.speed_switches))

    def evaluations_per_prompt(self) -> int:
        """Velocity evaluations (trajectory evaluations) the rollouts of one prompt cost at the current iteration
        (E-GRPO: ``T`` for the anchor plus ``G * (T - k - l)`` per merged step, the branch step reusing the anchor's
        velocity). The transformer runs ``adapter.transformer_rows_per_evaluation`` rows for each: two under
        classifier-free guidance."""
        return self.strategy.evaluations_per_prompt(self.state.iteration)

    # ------------------------------------------------------------------ saving

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the trained model: the LoRA in diffusers format (``pipe.load_lora_weights(output_dir)``),
        or, when fully fine-tuning, the whole transformer in diffusers' layout in ``output_dir/transformer``."""
        output_dir = output_dir or self.config.output_dir
        # Every process takes part in gathering the full state dict (sharded under FSDP / DeepSpeed ZeRO-3).
        state_dict = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            model = self.unwrapped_model
            if self.config.use_peft:
                from peft import get_peft_model_state_dict

                self.adapter.save_lora_weights(output_dir, get_peft_model_state_dict(model, state_dict=state_dict))
            else:
                self.adapter.save_transformer(os.path.join(output_dir, "transformer"), state_dict)
        self.accelerator.wait_for_everyone()

    def _hub_preflight(self) -> str:
        """Check on the main process that ``hub_model_id`` can be pushed to (:func:`~trl_flow_egrpo.hub.preflight`);
        every process raises its error, so none is left waiting. Returns the full repository id."""
        from accelerate.utils import broadcast_object_list

        from . import hub

        config = self.config
        outcome = [None]
        if self.accelerator.is_main_process:
            try:
                outcome[0] = hub.preflight(
                    config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir)),
                    token=config.hub_token,
                    private=config.hub_private,
                )
            except hub.HubError as error:
                outcome[0] = error
        broadcast_object_list(outcome)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    def push_to_hub(self, commit_message: str | None = None, checkpoint: str | None = None) -> str | None:
        """Save the model to ``output_dir`` with a generated model card (``README.md``) and upload it to
        ``config.hub_model_id``. The repository then loads with ``pipe.load_lora_weights(repo_id)``.

        Args:
            commit_message: the Hub commit message.
            checkpoint: also upload this checkpoint directory to the repository's ``last-checkpoint/``
                folder (``hub_strategy="every_save"`` does), so training can resume from the Hub with
                ``resume_from_checkpoint=trl_flow_egrpo.hub.download_checkpoint(repo_id)``.

        Returns the model commit's URL on the main process (None on the others).

        Raises:
            HubError: the upload failed; the message says where the model is saved and how to upload it later.
        """
        from . import hub

        config = self.config
        self.save_model(config.output_dir)
        if not self.accelerator.is_main_process:
            return None
        repo_id = self.hub_repo_id or config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir))
        last_eval = self.state.eval_history[-1] if self.state.eval_history else {}
        metrics = {key: value for key, value in last_eval.items() if key != "iteration"}
        grid = os.path.join(config.output_dir, EVAL_GRID)
        card = hub.build_model_card(
            base_model=self.pipeline.config.get("_name_or_path") or None,
            repo_id=repo_id,
            config_dict=config.to_dict(),
            merge_plan_table=self.strategy.describe(),
            reward_names=self.reward_names,
            reward_weights=self.reward_weights.tolist(),
            eval_reward_names=self.eval_reward_names,
            metrics=metrics,
            image_grid_path=EVAL_GRID if os.path.isfile(grid) else None,
            adapter=self.adapter,
            use_lora=config.use_peft,
        )
        card.save(os.path.join(config.output_dir, "README.md"))
        message = commit_message or f"E-GRPO: {self.state.iteration} iterations"
        url = hub.upload_folder(
            config.output_dir, repo_id, private=config.hub_private, token=config.hub_token, commit_message=message
        )
        if checkpoint is not None:
            hub.upload_folder(
                checkpoint,
                repo_id,
                private=config.hub_private,
                token=config.hub_token,
                commit_message=f"{message} (checkpoint)",
                path_in_repo=hub.LAST_CHECKPOINT,
            )
        return url

    def save_checkpoint(self) -> str:
        """Write a resumable checkpoint of the current iteration, atomically; returns its directory."""
        config = self.config
        return checkpoints.save(
            self.accelerator,
            config.output_dir,
            self.state,
            config.to_dict(),
            self.generator,
            config.save_total_limit,
            save_extra=self._save_checkpoint_extra,
        )

    def _save_checkpoint_extra(self, directory: str) -> None:
        """The checkpoint's files beyond the accelerate state: the LoRA in diffusers format, the old policy."""
        if self.config.use_peft:
            self.save_model(directory)
        if self.old_policy is not None and self.accelerator.is_main_process:
            checkpoints.save_old_policy(directory, self.old_policy)

    def load_checkpoint(self, checkpoint: str | bool) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`, so that training continues exactly as if it
        had not stopped. ``True`` / ``"true"``: the newest checkpoint in ``output_dir`` that is undamaged
        (damaged ones are skipped with a warning; see :func:`~trl_flow_egrpo.checkpoints.resolve`). The
        checkpoints of ``output_dir`` later than the one resumed are renamed aside first
        (:func:`~trl_flow_egrpo.checkpoints.resume_checkpoint`).

        Raises:
            CheckpointError: no checkpoint to resume from, or a damaged one (naming it and the file).
        """
        checkpoint = checkpoints.resume_checkpoint(self.accelerator, checkpoint, self.config.output_dir)
        self.state = checkpoints.load(self.accelerator, checkpoint, self.generator)
        if self.old_policy is not None:
            checkpoints.load_old_policy(checkpoint, self.old_policy)
        logger.info("Resumed from %s at iteration %d.", checkpoint, self.state.iteration)
