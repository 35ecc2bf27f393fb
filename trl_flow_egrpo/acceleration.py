"""Speed switches of the transformer and the optimizer, and the numbers that say how fast a run goes.

* :func:`compile_repeated_blocks`: regional ``torch.compile`` of the transformer's repeated blocks, applied
  once to the one module that both samples and trains (so sampling and update run the same compiled code);
* :func:`set_attention_backend`: diffusers' attention dispatcher backend (``"native"``, ``"_native_flash"``,
  ``"_native_cudnn"``, ``"flash"``, ...), checked against the installed diffusers;
* :func:`set_lora_input_cast`: peft's cast of every LoRA layer's input to the LoRA weights' dtype;
* :func:`build_optimizer`: AdamW, fused on CUDA;
* :func:`transformer_flops_per_row` and :func:`peak_tflops`: the two ends of the sampling phase's MFU;
* :class:`PhasePeakMemory`: peak CUDA memory of each phase of an iteration.

``docs/performance.md`` says what each switch does, what it measured, and when to use it.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile`` modes accepted by ``compile_mode``."""

BF16_DENSE_TFLOPS = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5),
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)
"""bf16 dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets (H100 = the SXM part), by
device-name substring, first match first (the RTX 4090's with float32 accumulation). Unknown devices get no
MFU unless ``peak_tflops`` is configured."""


# --- attention backend ------------------------------------------------------------------------------------


def attention_backends() -> tuple[str, ...]:
    """The attention backend names of the installed diffusers' dispatcher (``AttentionBackendName``), sorted."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return tuple(sorted(member.value for member in AttentionBackendName))


def check_attention_backend(name: str) -> None:
    """Raise a ``ValueError`` naming the allowed values when ``name`` is not a diffusers attention backend."""
    allowed = attention_backends()
    if name not in allowed:
        raise ValueError(
            f"attention_backend={name!r} is not allowed: attention_backend must be None (the "
            f"model's default, PyTorch SDPA) or one of the installed diffusers' backends {allowed}. "
            "'native' is PyTorch SDPA with its own kernel choice; '_native_flash', '_native_cudnn', "
            "'_native_efficient' force one SDPA kernel."
        )


def set_attention_backend(model: torch.nn.Module, name: str) -> None:
    """Route every attention of ``model`` (a diffusers model) through the dispatcher backend ``name``.

    Raises:
        ValueError: unknown name, a model without diffusers' attention dispatcher, or a backend whose package
            (``flash-attn``, ``kernels``, ``sageattention``, ...) is missing.
    """
    check_attention_backend(name)
    if not callable(getattr(model, "set_attention_backend", None)):
        raise ValueError(
            f"attention_backend={name!r} but {type(model).__name__} has no set_attention_backend: "
            "it is not a diffusers model with the attention dispatcher. Set attention_backend=None."
        )
    try:
        model.set_attention_backend(name)
    except RuntimeError as error:  # diffusers' requirement check: the backend's package is missing
        raise ValueError(
            f"attention_backend={name!r} cannot run here: {error} Install what it needs or choose "
            "'native' (PyTorch SDPA)."
        ) from error


# --- regional compilation ---------------------------------------------------------------------------------


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: the modules whose class is named in the model's
    ``_repeated_blocks`` (diffusers' convention), else every child of every ``ModuleList``."""
    names = getattr(model, "_repeated_blocks", None)
    if names:
        return [module for module in model.modules() if type(module).__name__ in names]
    return [block for module in model.modules() if isinstance(module, torch.nn.ModuleList) for block in module]


def compile_repeated_blocks(model: torch.nn.Module, mode: str = "default") -> int:
    """Compile each repeated block of ``model`` in place (``block.compile(mode=mode)``); returns their number.

    Blocks of one class share their compiled code, so compilation costs a few graphs, not one per block
    (diffusers' ``compile_repeated_blocks``). Compile after the LoRA is added: the compiled code then contains
    it, and sampling (no grad) and the update (grad) each get their graph of the same blocks.

    Raises:
        ValueError: unknown ``mode``, or no repeated blocks to compile.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode={mode!r} is not allowed: compile_mode must be one of {COMPILE_MODES}.")
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"compile_transformer=True but {type(model).__name__} has no repeated blocks (no "
            "_repeated_blocks and no ModuleList) to compile. Set compile_transformer=False."
        )
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


# --- LoRA input cast --------------------------------------------------------------------------------------


def set_lora_input_cast(model: torch.nn.Module, enabled: bool) -> int:
    """Turn peft's cast of each LoRA layer's input to the LoRA weights' dtype on or off; returns the layers set.

    peft casts ``x`` to float32 (the trained weights' dtype) before ``B(A(x))``. Under bf16/fp16 autocast the
    LoRA matmuls then cast ``x`` back to half precision, so the cast is a copy that changes no value: the
    bf16 -> fp32 -> bf16 round trip is exact. Off, the copy is skipped. Without autocast it is needed (a bf16
    input cannot multiply float32 weights), so turn it off only under mixed precision.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = enabled
    return len(layers)


def apply_speed_switches(model: torch.nn.Module, config) -> list[str]:
    """Apply ``config``'s attention backend, LoRA input cast and regional compilation to ``model`` (the
    transformer with its LoRA, before accelerate wraps it); returns one line per switch for the start log.

    The LoRA input cast stays on without mixed precision, where it is needed (:func:`set_lora_input_cast`).
    """
    switches = [f"attention backend {config.attention_backend or 'the model default (PyTorch SDPA)'}"]
    if config.attention_backend is not None:
        set_attention_backend(model, config.attention_backend)
    if config.use_peft:
        cast = config.lora_input_cast or config.mixed_precision == "no"
        layers = set_lora_input_cast(model, cast)
        switches.append(f"LoRA input cast {'on' if cast else 'off'} in {layers} layers")
    if config.compile_transformer:
        blocks = compile_repeated_blocks(model, config.compile_mode)
        switches.append(f"torch.compile of {blocks} repeated blocks (mode {config.compile_mode})")
    else:
        switches.append("no torch.compile")
    return switches


# --- optimizer --------------------------------------------------------------------------------------------


def build_optimizer(parameters: list[torch.nn.Parameter], config) -> torch.optim.Optimizer:
    """The optimizer of ``parameters`` from ``config`` (an :class:`~trl_flow_egrpo.EGRPOConfig`): AdamW, with
    PyTorch's fused CUDA kernel (one launch for all tensors) when every parameter is on a CUDA device."""
    fused = bool(parameters) and all(parameter.is_cuda for parameter in parameters)
    return torch.optim.AdamW(
        parameters,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
        fused=fused or None,
    )


# --- efficiency -------------------------------------------------------------------------------------------


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The dense bf16 peak (TFLOP/s) that MFU divides by: ``override`` if given, else the CUDA device's entry
    of :data:`BF16_DENSE_TFLOPS` by name, else None (no MFU)."""
    if override is not None:
        return override
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in BF16_DENSE_TFLOPS if key in name), None)


def transformer_flops_per_row(
    adapter, model: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, conditioning
) -> int:
    """FLOPs of one row of the transformer's forward batch, counted by ``FlopCounterMode`` on a meta-device model of
    ``model``'s configuration, so nothing is computed or allocated: ``adapter.velocity`` on one sample, divided by
    the rows it runs (``adapter.transformer_rows_per_evaluation``: 2 under classifier-free guidance).

    Counts the base transformer (matmuls and attention: ``2 * m * n * k`` per matmul); the LoRA adds
    ``2 * r * (in + out)`` per token and layer (about 2% at FLUX.1-dev's width with r = 32) and is left out,
    as MFU conventions count the model's own FLOPs.

    Args:
        latents, timesteps, conditioning: one row of the velocity's inputs (any device; only shapes are read).

    Returns:
        The FLOPs, or 0 (with a warning) when the model's forward does not run on meta tensors.
    """
    from diffusers.models.attention_dispatch import attention_backend
    from torch.utils._pytree import tree_map
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        # nn.Module.to: diffusers' own .to warns about dtype casts, which change no FLOP count here.
        meta_model = torch.nn.Module.to(type(model).from_config(model.config), model.dtype)

    def to_meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    # PyTorch SDPA whatever the run's backend: its FLOPs are the same, and it runs on meta tensors.
    try:
        with torch.no_grad(), attention_backend("native"), FlopCounterMode(display=False) as counter:
            adapter.velocity(meta_model, to_meta(latents), to_meta(timesteps), tree_map(to_meta, conditioning))
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        # A metric must not stop a run: a model whose forward does not run on meta tensors logs no MFU.
        logger.warning(
            "No time/sampling_mfu: counting the FLOPs of a transformer row on the meta device failed (%s).", error
        )
        return 0
    return counter.get_total_flops() // adapter.transformer_rows_per_evaluation


class PhasePeakMemory:
    """Peak CUDA memory of each phase of an iteration: ``memory/<phase>_peak_allocated_gib`` and
    ``memory/<phase>_peak_reserved_gib`` (the caching allocator's reservation, what ``nvidia-smi`` sees).

    ``with peaks("sampling"): ...`` resets the allocator's peak statistics at entry and records them at exit;
    off CUDA it records nothing. ``peaks.values`` holds the metrics. As the statistics are reset at every
    phase, the peak of a whole iteration is the largest of its phases' (:meth:`overall`).
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.values: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.cuda:
            self.values[f"memory/{phase}_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.values[f"memory/{phase}_peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30

    @staticmethod
    def overall(metrics: dict[str, float], kind: str = "allocated") -> float | None:
        """The largest ``memory/<phase>_peak_<kind>_gib`` among ``metrics`` (an iteration's), or None."""
        peaks = [
            value for key, value in metrics.items() if key.startswith("memory/") and key.endswith(f"_peak_{kind}_gib")
        ]
        return max(peaks) if peaks else None
