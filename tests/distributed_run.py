"""Run by test_distributed.py in each of 2 CPU processes (gloo): ``distributed_run.py <output_dir> <scenario>``.

Scenarios:

- ``ddp``, ``fsdp``, ``deepspeed2``: the same short LoRA run (cosine schedule with warm-up, two micro-batches
  per optimizer step, an evaluation with padding first, a checkpoint half-way), then a second run resumed
  from that checkpoint. ``fsdp`` loads the pipeline with ``fsdp_cpu_ram_efficient_loading`` (rank 1 gets a
  placeholder transformer) and checks that a non-final micro-batch leaves only sharded gradients.
- ``deepspeed3``: the same with full fine-tuning under ZeRO-3.
- ``failure``: the reward raises on rank 1, which then stays alive (as a process whose death its peers cannot
  detect, e.g. under NCCL); rank 0 must stop by itself.

Each rank writes ``rank_<r>.json`` (its training prompts per iteration, logs, evaluation) and
``weights_<r>.pt`` (its full view of the trainable weights); the saved models are in ``final/`` and
``resumed/final/``.

accelerate runs FSDP and DeepSpeed only on accelerators, so :func:`present_cpu_group_as_accelerator_run`
sets accelerate up over a gloo CPU process group (a test harness only: the training code is unchanged).
"""

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from datasets import Dataset  # noqa: E402

from helpers import PROMPTS, tiny_config  # noqa: E402

TRAIN_PROMPTS = PROMPTS + ["a yellow taxi", "a snowy mountain"]  # 8: each iteration takes half an epoch
EVAL_PROMPTS = ["a red apple", "a blue car", "a green field"]  # 3: padded to 4 on 2 processes
TINY_FLUX_BLOCKS = "FluxTransformerBlock,FluxSingleTransformerBlock"


def run_config(scenario: str, output_dir: str, **overrides):
    """The config every backend scenario trains with (the test builds the same one for its references)."""
    values = dict(
        max_steps=4,
        save_steps=2,
        num_generations=3,
        prompts_per_device=2,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        use_peft=scenario != "deepspeed3",
    )
    values.update(overrides)
    return tiny_config(output_dir, **values)


def index_reward(images, prompts, index, **columns):
    """The eval prompt's position: the gathered scores show exactly which prompts were counted, how often."""
    return [float(i) for i in index]


def brightness(images, prompts, **columns):
    """The mean pixel value: a score that depends on the sampled image."""
    return images.mean(dim=(1, 2, 3))


def present_cpu_group_as_accelerator_run(scenario: str) -> None:
    """Make accelerate run FSDP2 / DeepSpeed over a gloo process group of CPU processes.

    accelerate enables FSDP only for GPU-type runs and DeepSpeed only when not told ``cpu=True`` (which the
    trainer says for multi-process CPU runs); both work on CPU tensors over gloo.
    """
    import accelerate.state
    from accelerate.utils import DistributedType

    import trl_flow_egrpo.trainer

    trl_flow_egrpo.trainer.is_multiprocess_cpu_run = lambda: False
    if scenario == "fsdp":
        os.environ.update(
            ACCELERATE_USE_FSDP="true",
            FSDP_VERSION="2",
            FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
            FSDP_TRANSFORMER_CLS_TO_WRAP=TINY_FLUX_BLOCKS,
            FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT",
            FSDP_RESHARD_AFTER_FORWARD="true",
            FSDP_CPU_RAM_EFFICIENT_LOADING="true",
            ACCELERATE_TORCH_DEVICE="cpu",
        )
        dist.init_process_group("gloo")
        accelerate.state.PartialState._prepare_backend = lambda self, cpu=False, sagemaker_dp=False, backend=None: (
            "gloo",
            DistributedType.MULTI_GPU,
        )
    else:
        os.environ.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=scenario[-1])
        accelerate.state.PartialState(backend="gloo")


def full_trainable_weights(trainer) -> dict[str, torch.Tensor]:
    """This rank's view of the whole trainable weights (FSDP shards gathered; every rank calls this)."""
    weights = {}
    for name, parameter in trainer.unwrapped_model.named_parameters():
        if parameter.requires_grad:
            full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            weights[name] = full.detach().clone()
    return weights


def sharded_gradient_check(trainer) -> dict[str, int]:
    """One non-final micro-batch's backward under the trainer's accumulation context, then under ``no_sync``:
    how many gradient elements each leaves on this rank (FSDP2 under ``no_sync`` holds the unsharded gradient
    internally and leaves ``.grad`` empty until the final micro-batch)."""
    from trl_flow_egrpo import backends

    rollouts = trainer.generate([PROMPTS[0]])
    advantages = torch.ones(rollouts.num_groups, rollouts.samples.shape[1])
    held = {}
    for label, context in (
        ("accumulation_context", backends.accumulation_context(trainer.accelerator, trainer.model, boundary=False)),
        ("no_sync", trainer.accelerator.no_sync(trainer.model)),
    ):
        trainer.model.train()
        with context:
            output, _ = trainer._policy_loss(rollouts, advantages, torch.arange(1))
            trainer.accelerator.backward(output.loss)
        held[label] = sum(p.grad.to_local().numel() for p in trainer.model.parameters() if p.grad is not None)
        trainer.optimizer.zero_grad(set_to_none=True)
    held["full"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return held


def train_and_resume(output_dir: str, scenario: str) -> None:
    from trl_flow_egrpo import EGRPOTrainer, registry
    from trl_flow_egrpo.rewards import ColorReward
    from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

    training_prompts = []  # per iteration of the first run: the reward sees all of an iteration's images at once

    def color(images, prompts, **columns):
        if recording:
            training_prompts.append(sorted(set(prompts)))
        return ColorReward()(images, prompts)

    def trainer_for(run_dir, **overrides):
        pipeline = registry.load_pipeline("tiny", torch.float32, main_process_weights_only=True)  # seeded
        return EGRPOTrainer(
            run_config(scenario, run_dir, **overrides),
            pipeline,
            [color],
            Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
            eval_dataset=Dataset.from_dict({"prompt": EVAL_PROMPTS, "index": list(range(len(EVAL_PROMPTS)))}),
            eval_reward_fns=[index_reward, brightness],
        )

    rank = int(os.environ["RANK"])
    loaded = registry.load_pipeline("tiny", torch.float32, main_process_weights_only=True).transformer.state_dict()
    reference = build_tiny_flux_pipeline(seed=0).transformer.state_dict()
    loaded_real_weights = all(torch.equal(loaded[name], reference[name]) for name in reference)

    trainer = trainer_for(output_dir)
    recording = False
    evaluation = trainer.evaluate()
    recording = True
    state = trainer.train()
    recording = False
    trainer.save_model(os.path.join(output_dir, "final"))  # after train(): the process group must still be up
    weights = full_trainable_weights(trainer) if scenario != "deepspeed3" else {}
    gradients = sharded_gradient_check(trainer) if scenario == "fsdp" else None

    resumed = trainer_for(
        os.path.join(output_dir, "resumed"), resume_from_checkpoint=os.path.join(output_dir, "checkpoint-2")
    )
    resumed_state = resumed.train()
    resumed.save_model(os.path.join(output_dir, "resumed", "final"))
    resumed_weights = full_trainable_weights(resumed) if scenario != "deepspeed3" else {}

    torch.save({"trained": weights, "resumed": resumed_weights}, os.path.join(output_dir, f"weights_{rank}.pt"))
    with open(os.path.join(output_dir, f"rank_{rank}.json"), "w") as handle:
        json.dump(
            {
                "num_processes": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "loaded_real_weights": loaded_real_weights,
                "prompts": training_prompts,
                "optimizer_steps_per_iteration": trainer.optimizer_steps_per_iteration,
                "merge_plan": [[step.start, step.length] for step in trainer.merge_plan],
                "num_inference_steps": trainer.config.num_inference_steps,
                "evaluation": evaluation,
                "log_history": state.log_history,
                "resumed_log_history": resumed_state.log_history,
                "sharded_gradients": gradients,
            },
            handle,
        )


def fail_on_rank_1(output_dir: str) -> None:
    from helpers import tiny_trainer

    rank = int(os.environ["RANK"])

    def reward(images, prompts, **columns):
        if rank == 1:
            with open(os.path.join(output_dir, "failed_at"), "w") as handle:
                handle.write(str(time.time()))
            raise RuntimeError("reward server unreachable from rank 1")
        return images.mean(dim=(1, 2, 3))

    trainer = tiny_trainer(output_dir, reward_fns=[reward], max_steps=2, num_generations=3, prompts_per_device=1)
    try:
        trainer.train()
    except RuntimeError:
        traceback.print_exc()
        sys.stderr.flush()
        open(os.path.join(output_dir, "reported"), "w").close()
        time.sleep(120)  # alive, but gone from training: its peers cannot tell
        raise


if __name__ == "__main__":
    output_dir, scenario = sys.argv[1], sys.argv[2]
    if scenario == "failure":
        fail_on_rank_1(output_dir)
    else:
        if scenario != "ddp":
            present_cpu_group_as_accelerator_run(scenario)
        train_and_resume(output_dir, scenario)
