"""A quantized frozen base transformer under the trained LoRA, and 8-bit AdamW: FLUX.1-dev on a 24 GB GPU.

The base transformer's weights never change when training a LoRA, so they can be stored in fewer bits: the
forward pass dequantizes each weight (or runs a mixed-precision kernel), while the LoRA and its optimizer
state stay in float32. FLUX.1-dev's 11.9B transformer parameters take 23.8 GB in bf16, about 11.9 GB in
int8 or float8 (1 B per weight plus one scale per output row) and about 6.7 GB in NF4 (4 bits per weight
plus block scales; the layers bitsandbytes does not quantize stay in bf16). See docs/memory-24gb.md.

Methods (``EGRPOConfig.quantization``):

* ``"int8-weight-only"`` / ``"float8-weight-only"``: torchao, applied by :func:`quantize_base_weights` to the
  already-loaded transformer, after the LoRA is added, to every ``nn.Linear`` that is not a LoRA matrix
  (so any peft version wraps plain linear layers). Runs on CPU too (int8), which is what the tests use.
* ``"nf4"``: bitsandbytes through diffusers' quantization config at load time
  (:func:`nf4_pipeline_quantization_config`; diffusers requires a GPU to load it). The trainer checks that
  the transformer it receives was loaded that way.

Sampling and training run the same quantized forward, so the on-policy ratio stays exactly 1.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

TORCHAO_METHODS = ("int8-weight-only", "float8-weight-only")
"""Methods :func:`quantize_base_weights` applies with torchao."""
EXTRA = "quantization"
"""The package extra that installs the quantization libraries: ``pip install "trl-flow-egrpo[quantization]"``."""


def require(module: str, purpose: str):
    """Import ``module`` or raise an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs the '{package}' package, which is not installed. Install the "
            f'optional extra: pip install "trl-flow-egrpo[{EXTRA}]" (or pip install {package}).'
        ) from error


def is_lora_module(name: str) -> bool:
    """Whether the module named ``name`` (a fully qualified name) is one of peft's LoRA matrices."""
    return any(part.startswith("lora_") for part in name.split("."))


def torchao_config(method: str):
    """The torchao quantization config of ``method`` (weight-only: activations stay in their dtype)."""
    quantization = require("torchao.quantization", f"quantization={method!r}")
    if method == "int8-weight-only":
        return quantization.Int8WeightOnlyConfig()
    if method == "float8-weight-only":
        return quantization.Float8WeightOnlyConfig()
    raise ValueError(f"quantization={method!r} is not a torchao method; torchao methods: {TORCHAO_METHODS}.")


def is_nf4_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds bitsandbytes 4-bit linear layers (as diffusers loads them with an NF4 config)."""
    return any(type(child).__name__ == "Linear4bit" for child in module.modules())


def quantize_base_weights(
    transformer: torch.nn.Module,
    method: str,
    device: torch.device | str | None = None,
    distributed_backend: str | None = None,
) -> torch.nn.Module:
    """Quantize the frozen base weights of ``transformer`` in place, then move it to ``device``.

    torchao methods quantize every ``nn.Linear`` except the LoRA matrices, moving each layer to ``device`` just
    before quantizing it, so the full-precision model never has to fit on the device. Call it after the LoRA
    is added (peft then wraps plain linear layers, whatever its version; its own torchao support covers int8
    only). ``"nf4"`` only checks that the transformer was loaded in NF4 (see
    :func:`nf4_pipeline_quantization_config`).

    Args:
        transformer: the loaded transformer, on any device.
        method: ``"int8-weight-only"``, ``"float8-weight-only"`` or ``"nf4"``.
        device: where the model runs (None: where it is).
        distributed_backend: ``"fsdp"`` or ``"deepspeed"`` when the model is sharded: refused (sharding
            quantized tensor subclasses is not supported here), None otherwise.

    Raises:
        ValueError: a sharded run, or ``"nf4"`` with a transformer that was not loaded in NF4.
        ImportError: the library of ``method`` is missing (names the extra to install).
    """
    if distributed_backend is not None:
        raise ValueError(
            f"quantization={method!r} cannot be combined with {distributed_backend}: the quantized "
            "base is meant for one GPU per model copy. Launch without FSDP/DeepSpeed (plain DDP or one "
            "process), or set quantization=None and shard the bf16 model."
        )
    if method == "nf4":
        require("bitsandbytes", "quantization='nf4'")
        if not is_nf4_quantized(transformer):
            raise ValueError(
                "quantization='nf4' but the transformer was not loaded in NF4: load the pipeline with "
                "quantization_config=trl_flow_egrpo.quantization.nf4_pipeline_quantization_config() "
                "(needs a CUDA GPU), or use quantization='int8-weight-only', which the trainer applies "
                "to an already-loaded transformer."
            )
    else:
        torchao_quantization = require("torchao.quantization", f"quantization={method!r}")
        torchao_quantization.quantize_(
            transformer,
            torchao_config(method),
            device=device,
            filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and not is_lora_module(name),
        )
    if device is not None and not is_nf4_quantized(transformer):
        transformer.to(device)  # what quantize_ did not move: norms, embeddings, the LoRA
    return transformer


def nf4_pipeline_quantization_config(compute_dtype: torch.dtype = torch.bfloat16, components=("transformer",)):
    """diffusers' ``PipelineQuantizationConfig`` loading ``components`` in bitsandbytes NF4 (QLoRA's format).

    Double quantization also stores the block scales in 8 bits (about 4.13 bits per weight in all); matrix
    products run in ``compute_dtype``. Use it as
    ``FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16,
    quantization_config=nf4_pipeline_quantization_config())``; diffusers loads bitsandbytes models on a GPU only.
    """
    from diffusers.quantizers import PipelineQuantizationConfig

    require("bitsandbytes", "quantization='nf4'")
    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype,
        },
        components_to_quantize=list(components),
    )


def adamw_8bit(parameters: Iterable[torch.nn.Parameter], like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW over ``parameters`` with the hyperparameters of the AdamW ``like``.

    Its moments m and v are stored blockwise-quantized in 8 bits (2 B per parameter instead of AdamW's 8 B);
    the update itself is computed in float32.
    """
    optim = require("bitsandbytes.optim", "optimizer='adamw_8bit'")
    defaults = like.defaults
    return optim.AdamW8bit(
        list(parameters),
        lr=defaults["lr"],
        betas=defaults["betas"],
        eps=defaults["eps"],
        weight_decay=defaults["weight_decay"],
    )


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` stores; for a tensor subclass (torchao's quantized tensors), those of its inner tensors."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names if getattr(tensor, name) is not None)
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: block scales besides the data
    extra = tensor_bytes(quant_state.absmax) if getattr(quant_state, "absmax", None) is not None else 0
    return tensor.numel() * tensor.element_size() + extra


def module_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers of ``module``, as stored (quantized weights at their real size)."""
    return sum(tensor_bytes(t) for t in list(module.parameters()) + list(module.buffers()))


def precompute_run_prompts(trainer) -> int:
    """Encode into the prompt cache every prompt ``trainer`` will still visit; returns how many were encoded.

    Those are the training prompts of the iterations from the current one to ``max_steps`` (the order is fixed
    by the seed) and the evaluation prompts. Called after ``EGRPOTrainer(...)`` and before ``train()``, the text
    encoders visit the GPU while it holds only the quantized transformer, the LoRA and the VAE; training then
    never brings them back (FLUX.1-dev's T5-XXL takes 9 GiB, more than a 24 GB GPU has left mid-iteration).

    Raises:
        ValueError: ``prompt_cache_dir`` is not set (there is nowhere to keep the embeddings).
    """
    config = trainer.config
    if config.prompt_cache_dir is None:
        raise ValueError("precompute_run_prompts needs a cache for the embeddings: set prompt_cache_dir.")
    rows = [
        row
        for iteration in range(trainer.state.iteration, config.max_steps)
        for row in trainer.iteration_rows(iteration)
    ]
    if trainer.eval_dataset is not None:
        rows += trainer.with_source_images([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    # An image-editing family's entries are keyed by prompt and source image too.
    return trainer.prompt_encoder.warm([row[config.prompt_column] for row in rows], images=trainer.source_images(rows))
