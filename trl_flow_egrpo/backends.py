"""What the trainer does differently under each accelerate backend: DDP, FSDP2, DeepSpeed ZeRO.

The trainer has no dataloader and accumulates gradients over a variable number of micro-batches per
optimizer step, so it tells each backend explicitly what accelerate would otherwise infer from a
dataloader or from ``accelerator.accumulate``:

- **DDP**: micro-batches before the last skip the gradient all-reduce (``no_sync``).
- **FSDP2**: every micro-batch reduce-scatters its gradient. Under ``no_sync`` FSDP2 would keep each
  parameter's *unsharded* gradient until the last micro-batch: a full-size gradient on every GPU (about
  22 GiB in bf16 for FLUX.1-dev's 12B parameters), the memory FSDP exists to avoid.
- **DeepSpeed**: its engine steps the optimizer inside ``accelerator.backward`` at what it is told is the
  accumulation boundary; the micro-batch size, accumulation steps and clipping it needs are set here,
  because accelerate can only infer them from a dataloader.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os

import torch
from accelerate.utils import DistributedType


def is_fsdp(accelerator) -> bool:
    """Whether the model is sharded by FSDP."""
    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    """Whether the model is run by a DeepSpeed engine."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def weights_arrive_from_main_process(accelerator) -> bool:
    """Whether this process's transformer weights are placeholders that ``prepare`` overwrites.

    Under FSDP with ``fsdp_cpu_ram_efficient_loading``, accelerate shards the model from the main process's
    full weights, broadcast parameter by parameter; the other processes' values are never read. Their
    transformer can then be uninitialized memory (:func:`trl_flow_egrpo.registry.load_pipeline` loads it so),
    which Linux does not back with RAM until it is written, and must not be copied (e.g. upcast) before.
    """
    plugin = accelerator.state.fsdp_plugin if is_fsdp(accelerator) else None
    return bool(plugin is not None and plugin.cpu_ram_efficient_loading and not accelerator.is_main_process)


def placeholder_weights_requested(environ=os.environ) -> bool:
    """Whether this process of an ``accelerate launch`` may load its transformer as a placeholder.

    The launch's FSDP settings are read from the environment ``accelerate launch`` sets from its config
    (``ACCELERATE_USE_FSDP``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``) and the rank from ``RANK``, because the pipeline
    is loaded before the trainer's ``Accelerator`` exists. Agrees with :func:`weights_arrive_from_main_process`.
    """

    def flag(name: str) -> bool:
        return environ.get(name, "false").lower() in ("1", "true", "yes")

    return flag("ACCELERATE_USE_FSDP") and flag("FSDP_CPU_RAM_EFFICIENT_LOADING") and int(environ.get("RANK", "0")) != 0


def placeholder_model(model_class, config, dtype: torch.dtype) -> torch.nn.Module:
    """A ``model_class`` (a diffusers model) built from ``config`` whose parameters are uninitialized CPU memory.

    Nothing is read from disk and, until written, the memory is not backed by RAM (measured: a 4 GiB
    ``torch.empty`` adds under 1 MiB of resident memory). Buffers are computed as usual, since FSDP does not
    broadcast non-persistent ones (e.g. SD3's positional embedding).
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    with init_empty_weights(include_buffers=False):
        model = model_class.from_config(config)
    for name, parameter in list(model.named_parameters()):
        set_module_tensor_to_device(model, name, "cpu", value=torch.empty(parameter.shape, dtype=dtype), dtype=dtype)
    for name, buffer in list(model.named_buffers()):
        if buffer.is_floating_point():
            set_module_tensor_to_device(model, name, "cpu", value=buffer, dtype=dtype)
    return model


def micro_batches_per_optimizer_step(groups_per_step: int, micro_batch_size: int) -> int:
    """``ceil(groups_per_step / micro_batch_size)``: backward passes that accumulate into one optimizer step."""
    return -(-groups_per_step // micro_batch_size)


def configure_deepspeed(
    accelerator, micro_batch_size: int, micro_batches_per_step: int, max_grad_norm: float | None
) -> None:
    """Set, before ``accelerator.prepare``, the DeepSpeed values accelerate infers only from a dataloader.

    - ``train_micro_batch_size_per_gpu``: ``per_device_train_batch_size`` (groups per backward pass);
      ``train_batch_size = micro batch x 1 x processes``. Both are DeepSpeed's bookkeeping only: the trainer
      feeds the engine its micro-batches itself.
    - ``gradient_accumulation_steps``: 1. The trainer scales each micro-batch's loss by its share of the
      step and marks the boundary itself (:func:`accumulation_context`); DeepSpeed must not divide the loss
      again or count boundaries of its own.
    - ``gradient_clipping``: ``max_grad_norm`` (0 = off), since the engine clips inside its step.
    - ZeRO-3: ``stage3_gather_16bit_weights_on_model_save``, so that ``save_model`` can gather the sharded
      weights into one state dict.

    Raises:
        ValueError: the DeepSpeed config sets one of these values to something else (naming the value and the
            fix), or the installed accelerate cannot mark accumulation boundaries and a step has several
            micro-batches.
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = 0.0 if max_grad_norm is None else float(max_grad_norm)
    required = {
        "gradient_accumulation_steps": (
            1,
            "the trainer accumulates micro-batches itself: set it to 1 or "
            "'auto', and per_device_train_batch_size for the micro-batch size",
        ),
        "gradient_clipping": (
            clipping,
            "EGRPOConfig.max_grad_norm decides the clipping: set it to 'auto' "
            "or remove it, and set max_grad_norm instead",
        ),
    }
    for key, (value, fix) in required.items():
        current = config.get(key, "auto")
        if current != "auto" and not math.isclose(float(current), value):
            raise ValueError(f"The DeepSpeed config sets {key}={current}, but this trainer needs {value}: {fix}.")
        config[key] = value
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("train_batch_size", "auto") == "auto":
        config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * accelerator.num_processes
    if config.get("zero_optimization", {}).get("stage") == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if micro_batches_per_step > 1 and not _deepspeed_backward_honours_boundary():
        raise ValueError(
            f"Under DeepSpeed, an optimizer step of {micro_batches_per_step} micro-batches needs "
            "accelerate >= 1.8 (older versions step the engine after every backward pass): upgrade "
            "accelerate, or set per_device_train_batch_size to the groups per optimizer step."
        )


def _deepspeed_backward_honours_boundary() -> bool:
    """Whether accelerate's DeepSpeed backward steps the engine only where ``sync_gradients`` says so."""
    from accelerate.utils.deepspeed import DeepSpeedEngineWrapper

    return "sync_gradients" in inspect.signature(DeepSpeedEngineWrapper.backward).parameters


@contextlib.contextmanager
def accumulation_context(accelerator, model, boundary: bool):
    """The context of one micro-batch's forward and backward; ``boundary``: the optimizer step's last one.

    DDP: all-reduce only at the boundary (``no_sync`` before). FSDP: reduce-scatter every micro-batch, so only
    sharded gradients are ever kept. DeepSpeed: the engine reduces as its ZeRO stage requires and steps at the
    boundary (``sync_gradients`` tells ``accelerator.backward`` which backward is the boundary).
    """
    if boundary or is_fsdp(accelerator):
        yield
    elif is_deepspeed(accelerator):
        accelerator.sync_gradients = False
        try:
            yield
        finally:
            accelerator.sync_gradients = True
    else:
        with accelerator.no_sync(model):
            yield


def grad_norm_value(grad_norm) -> torch.Tensor:
    """The gradient norm ``clip_grad_norm_`` returned, as a float32 tensor ``[1]`` on the CPU.

    FSDP2 returns a replicated DTensor (its local value is the global norm), DeepSpeed a float or None
    before its first step (NaN then).
    """
    if grad_norm is None:
        return torch.tensor([math.nan])
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm, dtype=torch.float32).detach().cpu().view(1)
