"""Per-GPU memory of the two FLUX.1-dev E-GRPO recipes, component by component, computed on the meta device.

    python benchmarks/memory.py           # markdown tables (docs/distributed.md holds their output)
    python benchmarks/memory.py --json    # the same numbers as JSON

Nothing is allocated and nothing is downloaded. Every model is instantiated from its real configuration
(the dicts below, copied from the ``config.json`` files of the model repositories each one names) on the
meta device, which gives exact parameter counts. Activation memory is measured on the meta device too:
the forward (and backward) passes run on meta tensors under :class:`LiveBytes`, which adds up the bytes of
every tensor an operator creates and subtracts them when the tensor is freed, so its peak is the peak of
the activations the pass holds at once. Two recipes are read from ``examples/recipes/``:

* ``flux_dev_lora_single_gpu.yaml``: a rank-32 LoRA on one GPU (target: peak reserved <= 60 GiB on 80 GB);
* ``flux_dev_hps.yaml``: full fine-tuning with FSDP2 on 8 GPUs (target: <= 70 GiB per GPU);
* ``flux_dev_lora_24gb.yaml``: a LoRA on a quantized base with 8-bit AdamW on one 24 GB GPU (target: <= 22 GiB).

Each component has a "before" and an "after" column: "before" is the trainer that keeps the text encoders,
all reward models (float32) and FSDP's unsharded gradients on the GPU; "after" is the trainer that moves
the text encoders off the GPU once the prompts are encoded, scores with half-precision reward models, moves
evaluation-only rewards off the GPU between evaluations, and accumulates FSDP gradients sharded. The peak
of an iteration is the memory held throughout it (weights, optimizer state, the iteration's rollouts) plus
the largest of its phases' transient memory (encoding, sampling, decoding, scoring, update, evaluation).

Modelling choices, stated so that the numbers can be checked:

* Attention on the meta device runs the fused memory-efficient kernel (its memory is linear in the
  sequence), as SDPA does on a GPU; the meta device's own fallback would materialize the N x N scores.
* The passes run in bfloat16 throughout, LoRA included (autocast runs its matrix products in bf16). Under
  the trainer's bf16 autocast, peft also casts each LoRA input to the float32 of the LoRA weights, and
  layer norms run in float32: short-lived copies this model leaves out; ``benchmarks/gpu_probe.py``
  measures the real thing on a GPU.
* A quantized base (``quantization``) stores every linear weight of the transformer in its format
  (:data:`QUANTIZED_WEIGHT_BYTES`) and everything else in bf16; its forward dequantizes one weight at a time,
  counted as a bf16 copy of the largest linear weight in the sampling and update phases. The activations are
  those of the bf16 model (weight-only quantization leaves them in bf16).
* Not counted: the CUDA context (about 0.5 GiB outside PyTorch's allocator) and the caching allocator's
  slack (reserved minus allocated); ``gpu_probe.py`` reports both allocated and reserved peaks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import weakref
from collections.abc import Callable, Iterator

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- model configurations (data) ----------------------------------------------------------------------------

# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev, vae/config.json (AutoencoderKL).
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    force_upcast=True,
)
# black-forest-labs/FLUX.1-dev, text_encoder/config.json (CLIPTextModel: openai/clip-vit-large-patch14's text tower).
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# black-forest-labs/FLUX.1-dev, text_encoder_2/config.json (T5EncoderModel: the encoder of google/t5-v1_1-xxl).
T5_XXL_ENCODER = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu_new",
    is_gated_act=True,
    layer_norm_epsilon=1e-6,
    tie_word_embeddings=False,
    is_encoder_decoder=False,
    use_cache=False,
)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K, config.json (CLIPModel). The architecture of HPS v2.1 (open_clip's
# ViT-H-14: the same 986,109,441 parameters), of the CLIP-score reward and of yuvalkirstain/PickScore_v1.
CLIP_VIT_H_14 = dict(
    projection_dim=1024,
    text_config=dict(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=77,
        hidden_act="gelu",
    ),
    vision_config=dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    ),
)
# THUDM/ImageReward, med_config.json (BLIP's BERT-base text encoder with cross-attention); the image encoder
# is trl_flow_egrpo.rewards.image_reward.VISION_CONFIG (BLIP ViT-L/16 at 224 px).
IMAGE_REWARD_MED_CONFIG = dict(
    vocab_size=30524,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    pad_token_id=0,
    add_cross_attention=True,
)

REWARD_MODELS = {
    "hps": "clip_vit_h_14",
    "clip": "clip_vit_h_14",
    "pickscore": "clip_vit_h_14",
    "image_reward": "image_reward",
}
"""Registry name of a model-based reward (``trl_flow_egrpo.registry.REWARDS``) -> the network it runs."""

REWARD_IMAGE_SIZE = 224  # every reward above scores 224 x 224 inputs (HPS pads to that square, the others crop)
QUANTIZED_WEIGHT_BYTES = {
    "int8-weight-only": (1.0, 5),  # torchao Int8Tensor: int8 weights, a float32 scale and an int8 zero point per row
    "float8-weight-only": (1.0, 4),  # torchao Float8Tensor: float8 e4m3 weights, a float32 scale per row
    # bitsandbytes NF4 with double quantization: 4 bits per weight, a uint8 scale per block of 64 weights and a
    # float32 scale per 256 of those blocks.
    "nf4": (0.5 + 1 / 64 + 4 / (64 * 256), 0),
}
"""Quantization method -> (bytes per linear weight, bytes per output row) of the stored base weights."""
REWARD_BATCH_SIZE = 16  # ModelReward's default batch size

RECIPES = {
    "lora": dict(file="examples/recipes/flux_dev_lora_single_gpu.yaml", gpus=1, fsdp=False, target_gib=60.0),
    "full": dict(file="examples/recipes/flux_dev_hps.yaml", gpus=8, fsdp=True, target_gib=70.0),
    "lora_24gb": dict(
        file="examples/recipes/flux_dev_lora_24gb.yaml", gpus=1, fsdp=False, target_gib=22.0, precompute_prompts=True
    ),
}
"""The recipes in the tables: YAML file, GPUs (FSDP2 shards over them), the peak-memory target, and whether the
run's prompt embeddings are precomputed before training (``trl_flow_egrpo.quantization.precompute_run_prompts``)."""


# --- building models on the meta device ---------------------------------------------------------------------


def build_on_meta(name: str, dtype: torch.dtype = torch.bfloat16, **overrides) -> torch.nn.Module:
    """Model ``name`` with its real configuration (``overrides`` replace fields), on the meta device, in eval mode.

    Names: ``transformer``, ``vae``, ``clip_l_text``, ``t5_xxl``, ``clip_vit_h_14``, ``image_reward``.
    """
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: _diffusers("FluxTransformer2DModel")(**(FLUX_DEV_TRANSFORMER | overrides)),
        "vae": lambda: _diffusers("AutoencoderKL")(**(FLUX_DEV_VAE | overrides)),
        "clip_l_text": lambda: _clip_text(CLIP_L_TEXT | overrides),
        "t5_xxl": lambda: _t5_encoder(T5_XXL_ENCODER | overrides),
        "clip_vit_h_14": lambda: _clip_model(CLIP_VIT_H_14 | overrides),
        "image_reward": lambda: _image_reward(IMAGE_REWARD_MED_CONFIG | overrides),
    }
    if name not in builders:
        raise ValueError(f"Unknown model {name!r}; known: {', '.join(builders)}.")
    with torch.device("meta"):
        model = builders[name]()
    if hasattr(model, "tie_weights"):  # as from_pretrained does (transformers 5.0 builds T5's embeddings untied)
        model.tie_weights()
    return model.to(dtype).eval()


def _diffusers(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


def _clip_text(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


def _t5_encoder(config: dict):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def _clip_model(config: dict):
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**config))


def _image_reward(med_config: dict):
    from transformers import BlipVisionConfig

    from trl_flow_egrpo.rewards.image_reward import VISION_CONFIG, ImageRewardModel, text_config_from_med_config

    vision = BlipVisionConfig(**VISION_CONFIG)
    return ImageRewardModel(vision, text_config_from_med_config(med_config, vision.hidden_size))


def parameter_count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def add_lora(transformer: torch.nn.Module, rank: int, alpha: int) -> torch.nn.Module:
    """Freeze ``transformer`` and add the trainer's LoRA (the FLUX adapter's default target modules)."""
    from peft import LoraConfig

    from trl_flow_egrpo.adapters.flux import FluxAdapter

    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights="gaussian",
            target_modules=list(FluxAdapter.default_lora_target_modules),
        )
    )
    return transformer


# --- measuring activation memory on the meta device -----------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Track the bytes of the tensors that operators create while the mode is active, and their peak.

    A storage is counted once when an operator first returns it and uncounted when it is freed (a weak
    reference's callback). Storages that exist before the mode (weights, inputs), and gradients once they
    land in a parameter's ``.grad``, are not activations and are excluded, so ``peak`` is the peak of
    activations and temporaries alone.
    """

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self.live: dict[int, tuple[weakref.ref | None, int]] = {_key(t): (None, 0) for t in existing}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and _key(tensor) not in self.live:
                storage = tensor.untyped_storage()
                key, size = _key(tensor), storage.nbytes()
                self.live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
                self.current += size
        self.peak = max(self.peak, self.current)
        return out

    def _free(self, key: int) -> None:
        _, size = self.live.pop(key, (None, 0))
        self.current -= size

    def exclude(self, tensor: torch.Tensor) -> None:
        """Stop counting ``tensor``'s storage (it became a parameter gradient)."""
        self._free(_key(tensor))
        self.live[_key(tensor)] = (None, 0)


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


@contextlib.contextmanager
def fused_attention_on_meta() -> Iterator[None]:
    """Make ``F.scaled_dot_product_attention`` run the fused memory-efficient kernel's meta implementation
    (output and log-sum-exp, no N x N scores), as on a GPU. Causal or grouped-query calls (short text
    towers) keep the default implementation."""
    original = torch.nn.functional.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if is_causal or enable_gqa:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        bias = None if attn_mask is None else attn_mask.to(query.dtype)
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, query.requires_grad, dropout_p, False, scale=scale
        )[0]

    torch.nn.functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def transformer_inputs(
    rows: int,
    size: int,
    text_tokens: int,
    config: dict = FLUX_DEV_TRANSFORMER,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """Keyword arguments of one FluxTransformer2DModel call on ``rows`` rows of ``size`` x ``size`` images.

    The latents are packed 2 x 2 after the VAE's 8x downsampling: ``(size / 16)**2`` image tokens of
    ``in_channels`` features; the text is ``text_tokens`` T5 embeddings of ``joint_attention_dim``.
    """
    image_tokens = (size // 16) ** 2
    return dict(
        hidden_states=torch.randn(rows, image_tokens, config["in_channels"], device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(rows, text_tokens, config["joint_attention_dim"], device=device, dtype=dtype),
        pooled_projections=torch.randn(rows, config["pooled_projection_dim"], device=device, dtype=dtype),
        timestep=torch.full((rows,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((rows,), 3.5, device=device, dtype=torch.float32),
        img_ids=torch.zeros(image_tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        return_dict=False,
    )


def forward_flops(transformer: torch.nn.Module, rows: int, size: int, text_tokens: int) -> int:
    """FLOPs of one transformer forward on ``rows`` rows, counted by ``FlopCounterMode`` on the meta device.

    ``transformer`` may live on any device; a meta copy of its configuration is counted, so nothing runs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = build_on_meta("transformer", **{k: transformer.config[k] for k in FLUX_DEV_TRANSFORMER})
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta(**transformer_inputs(rows, size, text_tokens, dict(transformer.config)))
    return counter.get_total_flops()


def _peak_bytes(module: torch.nn.Module, run: Callable[[], None]) -> int:
    """Peak activation bytes of ``run()`` (which uses ``module``), measured on the meta device."""
    parameters = list(module.parameters()) + list(module.buffers())
    with fused_attention_on_meta(), LiveBytes(parameters) as tracker:
        handles = [
            p.register_post_accumulate_grad_hook(lambda p: tracker.exclude(p.grad))
            for p in module.parameters()
            if p.requires_grad
        ]
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()
    return tracker.peak


def rollout_activation_bytes(transformer: torch.nn.Module, rows: int, size: int, text_tokens: int) -> int:
    """Peak activations of one sampling call: a no-grad forward of ``rows`` rows (inputs included)."""

    def run():
        with torch.no_grad():
            transformer(**transformer_inputs(rows, size, text_tokens))

    return _peak_bytes(transformer.eval(), run)


def update_activation_bytes(
    transformer: torch.nn.Module, rows: int, size: int, text_tokens: int, gradient_checkpointing: bool
) -> int:
    """Peak activations of one update micro-batch: forward and backward of ``rows`` rows (one row per group)."""
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    def run():
        transformer(**transformer_inputs(rows, size, text_tokens))[0].float().square().mean().backward()

    try:
        return _peak_bytes(transformer, run)
    finally:
        transformer.disable_gradient_checkpointing()
        transformer.zero_grad(set_to_none=True)
        transformer.eval()


def vae_decode_bytes(vae: torch.nn.Module, images: int, size: int) -> int:
    """Peak activations of decoding ``images`` latents of ``size`` x ``size`` images (output included)."""
    latents = vae.config.latent_channels
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def run():
        with torch.no_grad():
            vae.decode(
                torch.randn(images, latents, size // factor, size // factor, device="meta", dtype=torch.bfloat16)
            )

    return _peak_bytes(vae, run)


def t5_encode_bytes(t5: torch.nn.Module, prompts: int, text_tokens: int) -> int:
    """Peak activations of encoding ``prompts`` prompts of ``text_tokens`` tokens with the T5 encoder."""

    def run():
        with torch.no_grad():
            t5(input_ids=torch.zeros(prompts, text_tokens, dtype=torch.long, device="meta"))

    return _peak_bytes(t5, run)


def reward_scoring_bytes(clip: torch.nn.Module, images: int) -> int:
    """Peak activations of scoring ``images`` 224 x 224 crops with a CLIP model (image and text towers)."""

    def run():
        with torch.no_grad():
            clip(
                pixel_values=torch.randn(
                    images, 3, REWARD_IMAGE_SIZE, REWARD_IMAGE_SIZE, device="meta", dtype=torch.bfloat16
                ),
                input_ids=torch.zeros(images, 77, dtype=torch.long, device="meta"),
            )

    return _peak_bytes(clip, run)


# --- the recipes ----------------------------------------------------------------------------------------------


def load_recipe(name: str) -> dict:
    """A recipe's settings: its YAML file validated through ``EGRPOConfig`` (defaults filled in), plus the
    script's fields (``reward_funcs``, ...) and the table's own (``gpus``, ``target_gib``, ...)."""
    from trl_flow_egrpo import EGRPOConfig

    spec = RECIPES[name]
    with open(os.path.join(REPO, spec["file"])) as f:
        values = yaml.safe_load(f)
    fields = {field.name for field in dataclasses.fields(EGRPOConfig)}
    config = EGRPOConfig(**{key: value for key, value in values.items() if key in fields})
    return {**values, **config.to_dict(), "merge_length": config.merge_length, **spec}


@dataclasses.dataclass
class Row:
    """One line of a memory table: bytes per GPU before and after the trainer's memory changes."""

    component: str
    before: float
    after: float
    how: str
    phase: str | None = None  # None: held through the iteration; else the phase whose transient this is


def plan_length(recipe: dict) -> int:
    """Merged steps of the recipe's merge plan (groups per prompt), planned as the trainer plans them."""
    from trl_flow_egrpo import plan_merges, shifted_sigmas

    if recipe["shift"] is None:
        raise ValueError(f"{recipe['file']}: the memory model needs a static `shift` to plan the merges")
    sigmas = shifted_sigmas(recipe["num_inference_steps"], recipe["shift"])
    return len(
        plan_merges(
            sigmas,
            recipe["noise_level"],
            recipe["entropy_threshold"],
            recipe["num_active_steps"],
            recipe["merge_length"],
            recipe["merge_windows"],
            first_step=recipe["first_active_step"],
        )
    )


def recipe_rows(recipe: dict, measured: dict) -> list[Row]:
    """The memory table of one recipe: components held throughout, then each phase's transient memory."""
    gpus, size = recipe["gpus"], recipe["height"]
    counts = measured["parameters"]
    groups = recipe["prompts_per_device"] * plan_length(recipe)
    rollouts = groups * recipe["num_generations"] + recipe["prompts_per_device"]
    rows: list[Row] = []

    def same(component, nbytes, how, phase=None):
        rows.append(Row(component, nbytes, nbytes, how, phase))

    if recipe["use_peft"]:
        lora = counts["lora"]
        method = recipe.get("quantization")
        if method:
            per_weight, per_row = QUANTIZED_WEIGHT_BYTES[method]
            same(
                f"transformer weights ({method}, frozen)",
                quantized_transformer_bytes(counts, method),
                f"{counts['transformer_linear_weights'] / 1e9:.2f}B linear weights x {per_weight:.3f} B + "
                f"{per_row} B per row; other parameters x 2 B",
            )
        else:
            same("transformer weights (bf16, frozen)", 2 * counts["transformer"], "parameters x 2 B")
        same("LoRA parameters + gradients (fp32)", 8 * lora, f"{lora / 1e6:.1f}M LoRA parameters x (4 + 4) B")
        if recipe.get("optimizer") == "adamw_8bit":
            same(
                "8-bit AdamW state of the LoRA (uint8 m, v)",
                2 * lora,
                "LoRA parameters x 2 B (block scales left out: 8 B per 2,048 parameters)",
            )
        else:
            same("AdamW state of the LoRA (fp32 m, v)", 8 * lora, "LoRA parameters x 8 B")
    else:
        shard = counts["transformer"] / gpus
        same(f"transformer fp32 parameters, 1/{gpus} shard", 4 * shard, f"parameters x 4 B / {gpus} (FSDP2)")
        same(f"fp32 gradients, 1/{gpus} shard", 4 * shard, f"parameters x 4 B / {gpus}")
        same(f"AdamW state (fp32 m, v), 1/{gpus} shard", 8 * shard, f"parameters x 8 B / {gpus}")
        rows.append(
            Row(
                "unsharded bf16 gradients while accumulating",
                2 * counts["transformer"],
                0,
                "before: no_sync keeps FSDP2's unsharded gradients across the update's micro-batches; "
                "after: each micro-batch reduce-scatters into the shards",
            )
        )
    text_encoders = 2 * (counts["t5_xxl"] + counts["clip_l_text"])
    rows.append(
        Row(
            "text encoders T5-XXL + CLIP-L (bf16)",
            text_encoders,
            0,
            "before: resident; after: on the GPU only while encoding (see the encoding phase)",
        )
    )
    same("VAE (bf16)", 2 * counts["vae"], "parameters x 2 B")
    for name in recipe["reward_funcs"]:
        n = counts[REWARD_MODELS[name]]
        rows.append(
            Row(f"training reward {name} (fp32 -> fp16)", 4 * n, 2 * n, f"{n / 1e6:.0f}M parameters x 4 B / 2 B")
        )
    eval_weights = {name: counts[REWARD_MODELS[name]] for name in recipe.get("eval_reward_funcs") or []}
    if eval_weights:
        rows.append(
            Row(
                "evaluation-only rewards " + " + ".join(eval_weights),
                4 * sum(eval_weights.values()),
                0,
                "before: resident (fp32) after the first evaluation; after: on the GPU only while "
                "evaluating (see the evaluation phase)",
            )
        )
    image_bytes = 4 * 3 * size * size
    latent_bytes = 4 * (size // 16) ** 2 * FLUX_DEV_TRANSFORMER["in_channels"]
    same(
        "one iteration's rollouts (fp32 images and latents)",
        rollouts * (image_bytes + 2 * latent_bytes),
        f"{rollouts} images of {size}x{size} x 12 B + 2 latents each",
    )

    # Transients: only the largest phase counts towards the peak.
    if recipe["fsdp"]:
        # FSDP2 gathers a block's bf16 parameters while it runs and prefetches the next; the root's own
        # parameters stay gathered through the forward. The backward holds their unsharded gradients too.
        gathered = 2 * (2 * counts["transformer_largest_block"] + counts["transformer_root"])
        same("FSDP2: gathered bf16 parameters", gathered, "(2 largest blocks + root parameters) x 2 B", "sampling")
        same(
            "FSDP2: gathered bf16 parameters + their gradients",
            2 * gathered,
            "(2 largest blocks + root parameters) x (2 + 2) B",
            "update",
        )
    if recipe.get("precompute_prompts"):
        rows.append(
            Row(
                "encoding: none while training",
                measured["encoding"],
                0,
                "after: every prompt of the run precomputed into prompt_cache_dir before training (see "
                "the precompute line)",
                "encoding",
            )
        )
    else:
        rows.append(
            Row(
                "encoding: text encoders + T5 activations",
                measured["encoding"],
                text_encoders + measured["encoding"],
                "weights on the GPU during encoding only (after)",
                "encoding",
            )
        )
    if recipe.get("quantization"):
        dequantized = 2 * counts["transformer_largest_linear"]
        for phase in ("sampling", "update"):
            same(
                "dequantized copy of the largest linear weight (bf16)",
                dequantized,
                f"{counts['transformer_largest_linear'] / 1e6:.1f}M weights x 2 B",
                phase,
            )
    same(
        f"sampling: activations of a {recipe['rollout_batch_size']}-row forward"
        + (" with the LoRA" if recipe["use_peft"] else ""),
        measured["sampling"],
        "meta-device pass",
        "sampling",
    )
    decode_images = recipe["decode_batch_size"] or recipe["rollout_batch_size"]
    same(
        f"decoding: VAE decode of {decode_images} images",
        measured["decoding"],
        f"meta-device pass ({measured['decoding'] / decode_images / GIB:.2f} GiB per image)",
        "decoding",
    )
    same(
        f"scoring: {REWARD_BATCH_SIZE} crops through a reward model", measured["scoring"], "meta-device pass", "scoring"
    )
    same(
        f"update: forward + backward of {recipe['per_device_train_batch_size']} row(s)"
        + (", checkpointed" if recipe["gradient_checkpointing"] else ""),
        measured["update"],
        "meta-device pass",
        "update",
    )
    if eval_weights:
        rows.append(
            Row(
                "evaluation: evaluation rewards (fp16) + scoring",
                measured["scoring"],
                2 * sum(eval_weights.values()) + measured["scoring"],
                "weights on the GPU while evaluating",
                "evaluation",
            )
        )
    return rows


def precompute_bytes(recipe: dict, measured: dict) -> dict | None:
    """GPU memory while the run's prompts are precomputed (after the trainer is built, before training): the
    frozen transformer, the LoRA parameters (no gradients or optimizer state yet), the VAE, and the text
    encoders with T5's activations; None for a recipe that does not precompute."""
    if not recipe.get("precompute_prompts"):
        return None
    held = [
        row
        for row in recipe_rows(recipe, measured)
        if row.phase is None and row.component.startswith(("transformer weights", "VAE"))
    ]
    counts = measured["parameters"]
    text_encoders = 2 * (counts["t5_xxl"] + counts["clip_l_text"])
    total = sum(row.after for row in held) + 4 * counts["lora"] + text_encoders + measured["encoding"]
    return dict(
        total=total,
        how=" + ".join(row.component for row in held)
        + " + LoRA parameters (fp32) + text encoders (bf16) + T5 activations",
    )


def peak_by_quantization(recipe: dict, measured: dict) -> dict[str, float] | None:
    """The recipe's peak ("after") with each base-weight format instead of its own (``"none"``: bf16); None for
    a recipe without a quantized base."""
    if not recipe.get("quantization"):
        return None
    return {
        method or "none": totals(recipe_rows({**recipe, "quantization": method}, measured))["after"]["total"]
        for method in (None, *QUANTIZED_WEIGHT_BYTES)
    }


def totals(rows: list[Row]) -> dict:
    """Peak per GPU (bytes) before and after: the held components plus the largest phase's transients."""
    result = {}
    for column in ("before", "after"):
        held = sum(getattr(row, column) for row in rows if row.phase is None)
        phases: dict[str, float] = {}
        for row in rows:
            if row.phase is not None:
                phases[row.phase] = phases.get(row.phase, 0) + getattr(row, column)
        peak_phase = max(phases, key=phases.get)
        result[column] = dict(
            held=held, peak_phase=peak_phase, transient=phases[peak_phase], total=held + phases[peak_phase]
        )
    return result


@functools.lru_cache
def parameter_counts() -> dict[str, int]:
    """Parameters of every model of the tables, plus the transformer's largest block and its root (the
    parameters outside its blocks, which FSDP2 keeps gathered through a forward)."""
    counts = {
        name: parameter_count(build_on_meta(name))
        for name in ("vae", "clip_l_text", "t5_xxl", "clip_vit_h_14", "image_reward")
    }
    transformer = build_on_meta("transformer")
    block_sizes = [
        parameter_count(block)
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    ]
    counts["transformer"] = parameter_count(transformer)
    counts["transformer_largest_block"] = max(block_sizes)
    counts["transformer_root"] = counts["transformer"] - sum(block_sizes)
    linears = [module for module in transformer.modules() if isinstance(module, torch.nn.Linear)]
    counts["transformer_linear_weights"] = sum(module.weight.numel() for module in linears)
    counts["transformer_linear_rows"] = sum(module.out_features for module in linears)
    counts["transformer_largest_linear"] = max(module.weight.numel() for module in linears)
    return counts


def quantized_transformer_bytes(counts: dict[str, int], method: str) -> float:
    r"""Bytes of the transformer with its linear weights stored in ``method``'s format, the rest in bf16:

    .. math:: b_w N_{linear} + b_r R_{linear} + 2 (N - N_{linear})

    with ``(b_w, b_r)`` = :data:`QUANTIZED_WEIGHT_BYTES` [method], ``N_linear`` the linear weights, ``R_linear``
    their output rows and ``N`` all parameters (biases, norms and embeddings stay in bf16).
    """
    per_weight, per_row = QUANTIZED_WEIGHT_BYTES[method]
    linear = counts["transformer_linear_weights"]
    return per_weight * linear + per_row * counts["transformer_linear_rows"] + 2 * (counts["transformer"] - linear)


@functools.lru_cache
def activation_bytes(
    phase: str,
    batch: int,
    size: int,
    text_tokens: int,
    lora: tuple[int, int] | None = None,
    gradient_checkpointing: bool = False,
) -> int:
    """Peak activation bytes of one ``phase`` on ``batch`` rows / images / prompts, measured on the meta device.

    Phases: ``sampling`` and ``update`` (the transformer; ``lora`` = (rank, alpha) or None for full
    fine-tuning), ``decoding`` (the VAE), ``encoding`` (T5-XXL), ``scoring`` (a CLIP ViT-H-14 reward).
    """
    if phase in ("sampling", "update"):
        transformer = build_on_meta("transformer")
        if lora is not None:
            add_lora(transformer, *lora)
        if phase == "sampling":
            return rollout_activation_bytes(transformer, batch, size, text_tokens)
        return update_activation_bytes(transformer, batch, size, text_tokens, gradient_checkpointing)
    if phase == "decoding":
        return vae_decode_bytes(build_on_meta("vae"), batch, size)
    if phase == "encoding":
        return t5_encode_bytes(build_on_meta("t5_xxl"), batch, text_tokens)
    if phase == "scoring":
        return reward_scoring_bytes(build_on_meta("clip_vit_h_14"), batch)
    raise ValueError(f"Unknown phase {phase!r}.")


def measure(recipe: dict) -> dict:
    """Parameter counts and activation peaks (bytes) for ``recipe``, all on the meta device."""
    size, text = recipe["height"], recipe["max_sequence_length"]
    if recipe["width"] != size:
        raise ValueError(f"{recipe['file']}: the memory model assumes square images (height == width)")
    counts = dict(parameter_counts())
    lora = (recipe["lora_r"], recipe["lora_alpha"]) if recipe["use_peft"] else None
    if lora:
        counts["lora"] = parameter_count(add_lora(build_on_meta("transformer"), *lora), trainable_only=True)
    return dict(
        parameters=counts,
        sampling=activation_bytes("sampling", recipe["rollout_batch_size"], size, text, lora),
        update=activation_bytes(
            "update", recipe["per_device_train_batch_size"], size, text, lora, recipe["gradient_checkpointing"]
        ),
        decoding=activation_bytes("decoding", recipe["decode_batch_size"] or recipe["rollout_batch_size"], size, text),
        encoding=activation_bytes("encoding", recipe["prompts_per_device"], size, text),
        scoring=activation_bytes("scoring", REWARD_BATCH_SIZE, size, text),
    )


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose model classes the numbers come from."""
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in ("torch", "diffusers", "transformers", "peft")}


def report(recipes: list[str]) -> dict:
    """Library versions, and the rows, totals and target of each recipe, as plain data (what ``--json`` prints)."""
    result = {"versions": library_versions(), "recipes": {}}
    for name in recipes:
        recipe = load_recipe(name)
        measured = measure(recipe)
        rows = recipe_rows(recipe, measured)
        result["recipes"][name] = dict(
            recipe=recipe["file"],
            gpus=recipe["gpus"],
            target_gib=recipe["target_gib"],
            parameters=measured["parameters"],
            rows=[dataclasses.asdict(row) for row in rows],
            totals=totals(rows),
            precompute=precompute_bytes(recipe, measured),
            peak_by_quantization=peak_by_quantization(recipe, measured),
        )
    return result


def markdown(result: dict) -> str:
    """The memory tables of ``report()`` as markdown, after a line naming their source."""
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    lines = [f"Computed on the meta device by `benchmarks/memory.py` with {versions}.", ""]
    for table in result["recipes"].values():
        lines += [
            f"**{table['recipe']}** ({table['gpus']} GPU{'s' if table['gpus'] > 1 else ''}, target "
            f"<= {table['target_gib']:.0f} GiB per GPU)",
            "",
            "| component | phase | before (GiB) | after (GiB) | how |",
            "|---|---|---:|---:|---|",
        ]
        for row in table["rows"]:
            lines.append(
                f"| {row['component']} | {row['phase'] or 'held'} | {row['before'] / GIB:.2f} | "
                f"{row['after'] / GIB:.2f} | {row['how']} |"
            )
        for column in ("before", "after"):
            total = table["totals"][column]
            lines.append(
                f"| **peak, {column}** | held + {total['peak_phase']} | "
                + ("" if column == "after" else f"**{total['total'] / GIB:.1f}**")
                + " | "
                + (f"**{total['total'] / GIB:.1f}**" if column == "after" else "")
                + " | "
                f"{total['held'] / GIB:.1f} held + {total['transient'] / GIB:.1f} {total['peak_phase']} |"
            )
        if table.get("peak_by_quantization"):
            lines += [
                "",
                "The same recipe's peak with each format of the frozen base: "
                + ", ".join(
                    f"{method} {total / GIB:.1f} GiB" for method, total in table["peak_by_quantization"].items()
                )
                + ".",
            ]
        if table.get("precompute"):
            lines += [
                "",
                f"Precomputing the run's prompt embeddings before training peaks at "
                f"**{table['precompute']['total'] / GIB:.1f} GiB**: {table['precompute']['how']}.",
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown tables")
    parser.add_argument(
        "--recipe", choices=list(RECIPES), action="append", help="only this recipe (repeatable; default: all)"
    )
    args = parser.parse_args()
    result = report(args.recipe or list(RECIPES))
    print(json.dumps(result, indent=1) if args.json else markdown(result))


if __name__ == "__main__":
    main()
