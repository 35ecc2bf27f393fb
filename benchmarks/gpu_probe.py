"""GPU probe: the scale numbers of E-GRPO on FLUX.1-dev (random weights in its shapes), in one short run.

    python benchmarks/gpu_probe.py                                 # H100 / H200: a few minutes, at most --budget
    python benchmarks/gpu_probe.py --tiny --device cpu --out DIR   # smoke test of the script on a CPU (seconds)

On the device machine, ``benchmarks/run_gpu_probe.sh`` installs the missing packages and runs this (see
``benchmarks/README.md``). The models are those of ``benchmarks/gpu_iteration.py``: FLUX.1-dev's 12B
transformer, T5-XXL, CLIP-L and VAE with random weights, bf16, at 720x720 with 512 text tokens. Each
measurement prints one JSON line as it completes:

* ``device``: GPU, library versions, the bf16 dense peak used for MFU;
* ``flops``: FLOPs of one transformer row, counted by ``FlopCounterMode`` on the meta device;
* ``forward``: transformer forward (no grad, bf16 autocast) at 1, 12 and 24 rows: s per call, TFLOP/s, MFU;
* ``trainer_step``: one ``EGRPOTrainer.step()`` of ``examples/recipes/flux_dev_lora_single_gpu.yaml`` with
  ballast (``torch.empty`` bytes) standing in for the reward model's weights (HPS ViT-H-14, fp16): seconds,
  split, peak allocated / reserved GiB, on-policy max |r - 1|, sampling MFU;
* ``lora_forward``: the same forward with the trainer's LoRA (float32 under autocast), with and without
  peft's input dtype cast, against the adapters disabled;
* ``forward_compiled``: the LoRA forward at the sampling rows, eager and with the repeated blocks compiled
  (the trainer's ``compile_transformer``; runs last, as compiling changes the model in place): compile
  seconds, s per call, MFU of each, and the largest difference of their outputs. On a CPU it compiles with
  the ``eager`` backend (dynamo's tracing, no code generation), to stay a smoke test;
* ``update``: one row's forward + backward (one group of the update) with and without gradient checkpointing;
* ``update_phase``: one optimizer step of the update as the trainer takes it (the recipe's ``active_step``: the
  phase's rows, forward + backward with the trainer's LoRA and gradient checkpointing, then ``clip_grad_norm_`` +
  ``optimizer.step``): seconds of each part and the phase over its bare forward + backward (``ratio``);
* ``sdpa``: the attention backends at the sampling shape;
* ``vae_decode``: VAE decode at 1, 4 and 16 images: time and peak.

Sections after the forward one are skipped (logged as ``skipped``) when the time left in ``--budget`` is
less than their estimate, so the probe ends in time. The results file ``<date>-<device>.json`` in ``--out``
(default ``benchmarks/results/``) is rewritten after every section, with the top-level keys ``device``,
``commit``, ``rollout_mfu`` (best forward MFU at >= 12 rows), ``iteration_seconds``, ``peak_reserved_gib``,
``peak_allocated_gib``, ``on_policy_max_abs_dev`` and the sections under ``details``; at the end one row is
appended to ``RESULTS.md`` (``benchmarks/RESULTS.md``, or ``<out>/RESULTS.md`` when ``--out`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_iteration import build_trainer, flux_dev_shaped_pipeline, lora_recipe_config, timed_step  # noqa: E402
from memory import REPO, build_on_meta, forward_flops, parameter_count, transformer_inputs  # noqa: E402
from trl_flow_egrpo.acceleration import (  # noqa: E402
    build_optimizer,
    compile_repeated_blocks,
    peak_tflops,
    repeated_blocks,
    set_lora_input_cast,
)

LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "trl")
RESULTS_HEADER = """# GPU probe results

One row per run of `benchmarks/gpu_probe.py` on a GPU (how to run it: `benchmarks/README.md`). Every number
is the probe's own output; the row's JSON file in `benchmarks/results/` holds all the details. MFU is the
transformer forward's FLOPs (counted on the meta device) per second over the GPU's bf16 dense peak. The
iteration is one `EGRPOTrainer.step()` of `examples/recipes/flux_dev_lora_single_gpu.yaml` (720x720, G=12,
bf16) with random weights and ballast for the HPS reward model's fp16 weights; peaks are PyTorch's
allocator statistics over that step.

| date | device | commit | rollout MFU | s / iteration | peak reserved (GiB) | peak allocated (GiB) | on-policy max abs(r-1) | results |
|---|---|---|---:|---:|---:|---:|---:|---|
"""  # noqa: E501 (a Markdown table row is one line)


# --- small helpers ------------------------------------------------------------------------------------------


def is_cuda(device: str) -> bool:
    """Whether ``device`` names a CUDA device."""
    return str(device).startswith("cuda")


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize()


def seconds_per_call(fn, device: str, warmup: int = 2, repeats: int = 3) -> float:
    """Mean wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls, synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


@contextlib.contextmanager
def peak_memory(device: str):
    """Yield a dict that gets ``peak_gib``: the peak allocated GiB above the start (None off CUDA)."""
    result = {"peak_gib": None}
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    yield result
    if is_cuda(device):
        torch.cuda.synchronize()
        result["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def autocast(device: str):
    """bf16 autocast on CUDA (as the trainer's mixed precision), nothing on the CPU."""
    return torch.autocast("cuda", torch.bfloat16) if is_cuda(device) else contextlib.nullcontext()


def git_commit() -> str:
    """``EGRPO_COMMIT`` if set (the device machine has no git history), else ``git rev-parse`` of the repo."""
    if os.environ.get("EGRPO_COMMIT"):
        return os.environ["EGRPO_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def library_versions_lines() -> list[str]:
    """``name version`` of each library the probe runs on."""
    return [f"  {name} {version}" for name, version in library_versions().items()]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the probe runs on (None if missing)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def unmet_requirements() -> list[str]:
    """The project's runtime requirements (``pyproject.toml``) that the running Python does not satisfy."""
    import tomllib

    from packaging.requirements import Requirement

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        requirements = [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]
    unmet = []
    for requirement in requirements:
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement}: not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement}: {installed} installed")
    return unmet


def slug(text: str) -> str:
    """``text`` lower-cased with runs of other characters than letters and digits turned into '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- the run's record ----------------------------------------------------------------------------------------


class Probe:
    """The run: its time budget, its JSON lines, and its results file (rewritten after every section)."""

    def __init__(self, budget: float, out_dir: str, device_name: str):
        self.start = time.perf_counter()
        self.budget = budget
        os.makedirs(out_dir, exist_ok=True)
        stem = f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d}-{slug(device_name)}"
        self.path = os.path.join(out_dir, stem + ".json")
        copy = 1
        while os.path.exists(self.path):
            copy += 1
            self.path = os.path.join(out_dir, f"{stem}-{copy}.json")
        self.results = dict(
            device=device_name,
            commit=git_commit(),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            rollout_mfu=None,
            rollout_mfu_compiled=None,
            iteration_seconds=None,
            peak_reserved_gib=None,
            peak_allocated_gib=None,
            on_policy_max_abs_dev=None,
            details={},
        )

    def elapsed(self) -> float:
        """Seconds since the probe started."""
        return time.perf_counter() - self.start

    def has_time(self, section: str, estimate: float) -> bool:
        """Whether ``estimate`` seconds fit in the budget; logs ``section`` as skipped if not."""
        if self.elapsed() + estimate <= self.budget:
            return True
        self.log(section, skipped=True, estimate_s=round(estimate, 1), left_s=round(self.budget - self.elapsed(), 1))
        return False

    def log(self, section: str, **values) -> None:
        """Print one JSON line and keep it under ``details[section]`` (a list when a section logs several)."""
        print(json.dumps({"section": section, "t": round(self.elapsed(), 1), **values}), flush=True)
        details = self.results["details"]
        if section in details:
            details[section] = details[section] if isinstance(details[section], list) else [details[section]]
            details[section].append(values)
        else:
            details[section] = values
        self.save()

    def save(self) -> None:
        """Write the results file (atomically: a killed run leaves the last complete version)."""
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=1, default=_json_default)
        os.replace(self.path + ".tmp", self.path)

    def append_row(self, results_md: str) -> None:
        """Append this run's row to ``results_md`` (created with its header if missing)."""
        r = self.results

        def number(value, digits):
            return "-" if value is None else f"{value:.{digits}f}" if digits >= 0 else f"{value:.1e}"

        if not os.path.exists(results_md):
            with open(results_md, "w") as f:
                f.write(RESULTS_HEADER)
        row = (
            f"| {r['date'][:10]} | {r['device']} | {r['commit']} | {number(r['rollout_mfu'], 3)} | "
            f"{number(r['iteration_seconds'], 1)} | {number(r['peak_reserved_gib'], 1)} | "
            f"{number(r['peak_allocated_gib'], 1)} | {number(r['on_policy_max_abs_dev'], -1)} | "
            f"{os.path.basename(self.path)} |\n"
        )
        with open(results_md, "a") as f:
            f.write(row)


def _json_default(value):
    if hasattr(value, "item"):  # tensor or numpy scalars among the trainer's metrics
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value)}")


# --- the sections --------------------------------------------------------------------------------------------


def forward_section(probe: Probe, transformer, rows_list, size, text_tokens, flops_per_row, peak, device, dtype):
    """Transformer forward without grad at each row count: seconds, TFLOP/s, MFU, activation peak."""
    for rows in rows_list:
        inputs = transformer_inputs(rows, size, text_tokens, dict(transformer.config), device, dtype)
        with peak_memory(device) as memory, torch.no_grad(), autocast(device):
            seconds = seconds_per_call(functools.partial(transformer, **inputs), device)
        tflops = flops_per_row * rows / seconds / 1e12
        probe.log(
            "forward",
            rows=rows,
            s_per_call=round(seconds, 4),
            ms_per_row=round(1e3 * seconds / rows, 2),
            tflops=round(tflops, 3),
            mfu=round(tflops / peak, 3) if peak else None,
            activation_peak_gib=memory["peak_gib"],
        )


def trainer_step_section(probe: Probe, trainer, device, ballast_bytes, flops_per_row, peak):
    """One ``trainer.step()`` with ``ballast_bytes`` on the device standing in for the reward model's weights."""
    ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=device)
    result = timed_step(trainer, device)
    del ballast
    # The transformer's FLOPs over the whole sampling phase (its time includes LoRA, the SDE and decoding).
    sampling_tflops = result["transformer_rows"] * flops_per_row / result["time/sampling"] / 1e12
    values = dict(
        seconds=round(result["seconds"], 2),
        sampling_s=round(result["time/sampling"], 2),
        rewards_s=round(result["time/rewards"], 2),
        update_s=round(result["time/update"], 2),
        trajectory_evaluations=result["trajectory_evaluations"],
        transformer_rows=result["transformer_rows"],
        transformer_calls=result["transformer_calls"],
        on_policy_max_abs_dev=result["ratio/on_policy_max_abs_dev"],
        peak_allocated_gib=_round(result.get("peak_allocated_gib"), 2),
        peak_reserved_gib=_round(result.get("peak_reserved_gib"), 2),
        ballast_gib=round(ballast_bytes / 2**30, 2),
        sampling_tflops=round(sampling_tflops, 3),
        sampling_mfu=round(sampling_tflops / peak, 3) if peak else None,
        text_encoder_device_after=str(trainer.pipeline.text_encoder_2.device),
        logged={
            key: round(value, 4)
            for key, value in result.items()  # the trainer's own efficiency metrics
            if key.startswith(("time/sampling_", "time/update_rows", "memory/", "time/recompute"))
        },
        config={
            key: getattr(trainer.config, key)
            for key in (
                "height",
                "num_generations",
                "num_inference_steps",
                "num_active_steps",
                "rollout_batch_size",
                "decode_batch_size",
                "gradient_checkpointing",
                "lora_r",
                "mixed_precision",
            )
        },
    )
    probe.results.update(
        iteration_seconds=values["seconds"],
        on_policy_max_abs_dev=values["on_policy_max_abs_dev"],
        peak_allocated_gib=values["peak_allocated_gib"],
        peak_reserved_gib=values["peak_reserved_gib"],
    )
    probe.log("trainer_step", **values)


def lora_forward_section(probe: Probe, model, rows, size, text_tokens, device, dtype):
    """Forward time with the trainer's LoRA, without peft's input cast, and with the adapters disabled."""
    inputs = transformer_inputs(rows, size, text_tokens, dict(model.config), device, dtype)

    def timed():
        with torch.no_grad(), autocast(device):
            return round(seconds_per_call(lambda: model(**inputs), device), 4)

    lora = timed()
    model.disable_adapters()
    base = timed()
    model.enable_adapters()
    values = dict(rows=rows, lora_s=lora, adapters_disabled_s=base, lora_overhead=round(lora / base - 1, 3))
    try:
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(model):
            values["lora_without_input_cast_s"] = timed()
    except (ImportError, TypeError, ValueError) as error:  # older peft: no such helper
        values["lora_without_input_cast_error"] = str(error)[:200]
    probe.log("lora_forward", **values)


def compiled_forward_section(probe: Probe, model, rows, size, text_tokens, flops_per_row, peak, device, dtype):
    """The LoRA forward as the trainer samples (input cast off), eager, then with the repeated blocks compiled."""
    inputs = transformer_inputs(rows, size, text_tokens, dict(model.config), device, dtype)
    set_lora_input_cast(model, False)

    def forward():
        with torch.no_grad(), autocast(device):
            return model(**inputs)[0]

    def timed():
        seconds = seconds_per_call(forward, device)
        tflops = flops_per_row * rows / seconds / 1e12
        return round(seconds, 4), round(tflops / peak, 3) if peak else None

    eager_s, eager_mfu = timed()
    eager_output = forward().float()
    start = time.perf_counter()
    if is_cuda(device):
        compile_repeated_blocks(model)
    else:  # a smoke test: dynamo's tracing without inductor's C++ compilation (minutes on a CPU)
        for block in repeated_blocks(model):
            block.compile(backend="eager")
    compiled_output = forward().float()
    synchronize(device)
    compile_s = time.perf_counter() - start
    compiled_s, compiled_mfu = timed()
    probe.log(
        "forward_compiled",
        rows=rows,
        compile_s=round(compile_s, 1),
        eager_s=eager_s,
        compiled_s=compiled_s,
        speedup=round(eager_s / compiled_s, 3),
        eager_mfu=eager_mfu,
        compiled_mfu=compiled_mfu,
        max_abs_output_difference=(compiled_output - eager_output).abs().max().item(),
        backend="inductor" if is_cuda(device) else "eager",
    )
    if compiled_mfu is not None:
        probe.results["rollout_mfu_compiled"] = compiled_mfu


def update_section(probe: Probe, model, size, text_tokens, device, dtype):
    """One row's forward + backward (one update group) with and without gradient checkpointing."""
    inputs = transformer_inputs(1, size, text_tokens, dict(model.config), device, dtype)
    checkpointing = model.is_gradient_checkpointing

    def forward_backward():
        with autocast(device):
            output = model(**inputs)[0]
        output.float().square().mean().backward()

    for enabled in (True, False):
        (model.enable_gradient_checkpointing if enabled else model.disable_gradient_checkpointing)()
        try:
            with peak_memory(device) as memory:
                seconds = seconds_per_call(forward_backward, device, warmup=1, repeats=2)
            probe.log("update", gradient_checkpointing=enabled, s=round(seconds, 3), peak_gib=memory["peak_gib"])
        except torch.cuda.OutOfMemoryError:
            probe.log("update", gradient_checkpointing=enabled, error="out of memory")
        model.zero_grad(set_to_none=True)
    (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()


def update_phase_section(probe: Probe, trainer, size, text_tokens, device, dtype):
    """One optimizer step of the update as ``EGRPOTrainer.update`` takes it with ``optimizer_step='active_step'``:
    the phase's rows (one trained step per prompt) in micro-batches, forward + backward each, then
    ``accelerator.clip_grad_norm_`` + ``optimizer.step``. Each part is timed on its own (the second on the
    gradients the first left; a difference of two noisy totals would be noisier), and ``ratio`` is the phase over
    its bare forwards + backwards. The optimizer is the trainer's AdamW (fused on CUDA) over the LoRA with learning
    rate 0: the same kernels, and the weights the later sections measure stay as they are."""
    config, model = trainer.config, trainer.unwrapped_model
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = build_optimizer(parameters, config)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
    rows = config.prompts_per_device
    micro_batches = [
        transformer_inputs(len(chunk), size, text_tokens, dict(model.config), device, dtype)
        for chunk in torch.arange(rows).split(config.per_device_train_batch_size)
    ]

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)  # as after the trainer's step: fresh gradients, none accumulated
        for inputs in micro_batches:
            with autocast(device):
                output = model(**inputs)[0]
            output.float().square().mean().backward()

    def clip_and_step():
        trainer.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()

    bare = seconds_per_call(forward_backward, device, warmup=1, repeats=3)
    step = seconds_per_call(clip_and_step, device, warmup=1, repeats=5)  # the first allocates Adam's state
    optimizer.zero_grad(set_to_none=True)
    probe.log(
        "update_phase",
        rows=rows,
        micro_batches=len(micro_batches),
        gradient_checkpointing=model.is_gradient_checkpointing,
        trainable_parameters=sum(parameter.numel() for parameter in parameters),
        forward_backward_s=round(bare, 4),
        clip_and_step_s=round(step, 4),
        ratio=round((bare + step) / bare, 3),
    )


def sdpa_section(probe: Probe, rows, heads, tokens, head_dim, device, dtype):
    """Attention alone at the sampling shape, per SDPA backend: ms and TFLOP/s (4 * rows * heads * N^2 * d)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    query = torch.randn(rows, heads, tokens, head_dim, device=device, dtype=dtype)
    flops = 4 * rows * heads * tokens**2 * head_dim
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel(backend), torch.no_grad():
                seconds = seconds_per_call(
                    lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query), device, 1, 3
                )
            probe.log("sdpa", backend=backend.name, ms=round(1e3 * seconds, 2), tflops=round(flops / seconds / 1e12, 1))
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # backend unavailable for this shape/device
            probe.log("sdpa", backend=backend.name, error=str(error).splitlines()[0][:200])


def vae_decode_section(probe: Probe, vae, batches, size, device, dtype):
    """VAE decode of ``batch`` latents at ``size`` x ``size``: seconds and peak, per batch size."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for batch in batches:
        latents = torch.randn(
            batch, vae.config.latent_channels, size // factor, size // factor, device=device, dtype=dtype
        )
        try:
            with peak_memory(device) as memory, torch.no_grad(), autocast(device):
                seconds = seconds_per_call(functools.partial(vae.decode, latents, return_dict=False), device, 1, 2)
            probe.log(
                "vae_decode",
                batch=batch,
                s=round(seconds, 3),
                s_per_image=round(seconds / batch, 3),
                peak_gib=memory["peak_gib"],
            )
        except torch.cuda.OutOfMemoryError:
            probe.log("vae_decode", batch=batch, error="out of memory")


def _round(value, digits):
    return None if value is None else round(value, digits)


# --- main --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tiny", action="store_true", help="narrow models, 64x64 images, 16 text tokens: a smoke test of the script"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds; sections that would not end within it are skipped (default: 8 minutes)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="directory of the results JSON (default: benchmarks/results/; RESULTS.md then "
        "goes to this directory too instead of benchmarks/RESULTS.md)",
    )
    parser.add_argument(
        "--ballast_gib",
        type=float,
        default=None,
        help="GiB of ballast in the trainer step (default: HPS ViT-H-14 in fp16; 0 with --tiny)",
    )
    parser.add_argument(
        "--check_requirements",
        action="store_true",
        help="only check that the project's requirements are installed (exit status 1 if not)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.check_requirements:
        unmet = unmet_requirements()
        print("\n".join(["requirements:", *library_versions_lines(), *(f"UNMET {line}" for line in unmet)]))
        raise SystemExit(1 if unmet else 0)
    device = args.device
    if is_cuda(device) and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} but torch sees no CUDA GPU; use --device cpu (with --tiny).")
    if device == "cpu" and not args.tiny:
        raise SystemExit(
            "A FLUX.1-dev-sized probe needs a GPU (48 GB of float32 weights on a CPU); on a CPU pass --tiny."
        )
    dtype = torch.bfloat16 if is_cuda(device) else torch.float32
    device_name = torch.cuda.get_device_name(device) if is_cuda(device) else "cpu"
    peak = peak_tflops(torch.device(device))  # the table trl_flow_egrpo.acceleration.BF16_DENSE_TFLOPS; None on CPU
    out_dir = args.out or os.path.join(REPO, "benchmarks", "results")
    results_md = os.path.join(args.out, "RESULTS.md") if args.out else os.path.join(REPO, "benchmarks", "RESULTS.md")
    probe = Probe(args.budget, out_dir, device_name)
    size, text_tokens = (64, 16) if args.tiny else (720, 512)
    probe.results.update(tiny=args.tiny, budget_s=args.budget, size=size, text_tokens=text_tokens)
    probe.log(
        "device",
        name=device_name,
        bf16_dense_peak_tflops=peak,
        libraries=library_versions(),
        total_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        if is_cuda(device)
        else None,
    )
    if is_cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = True

    start = time.perf_counter()
    pipeline = flux_dev_shaped_pipeline(device, dtype, tiny=args.tiny)
    transformer = pipeline.transformer.requires_grad_(False)
    probe.log(
        "build",
        seconds=round(time.perf_counter() - start, 1),
        transformer_parameters=parameter_count(transformer),
        text_encoder_parameters=parameter_count(pipeline.text_encoder_2) + parameter_count(pipeline.text_encoder),
    )
    flops_per_row = forward_flops(transformer, 1, size, text_tokens)
    probe.log("flops", per_row=flops_per_row, image_tokens=(size // 16) ** 2, text_tokens=text_tokens)

    rows_list = (1, 2) if args.tiny else (1, 12, 24)
    forward_section(probe, transformer, rows_list, size, text_tokens, flops_per_row, peak, device, dtype)
    forwards = _as_list(probe.results["details"]["forward"])
    mfus = [entry["mfu"] for entry in forwards if entry["rows"] >= 12 and entry["mfu"] is not None]
    probe.results["rollout_mfu"] = max(mfus) if mfus else None
    sampling_rows = rows_list[-1] if args.tiny else 12
    row_seconds = next(entry["s_per_call"] / entry["rows"] for entry in forwards if entry["rows"] == sampling_rows)

    if args.ballast_gib is not None:
        ballast_bytes = int(args.ballast_gib * 2**30)
    else:
        ballast_bytes = 0 if args.tiny else 2 * parameter_count(build_on_meta("clip_vit_h_14"))
    scratch = tempfile.TemporaryDirectory(prefix="gpu-probe-")  # the trainer's output_dir (nothing is saved)
    trainer = build_trainer(pipeline, lora_recipe_config(scratch.name, device, args.tiny, max_steps=1))
    model = trainer.unwrapped_model  # the transformer with the recipe's LoRA
    # The iteration's transformer rows at the measured time per row, plus LoRA, decoding and the update.
    step_estimate = trainer.evaluations_per_prompt() * trainer.config.prompts_per_device * row_seconds * 1.6 + 30
    if probe.has_time("trainer_step", step_estimate):
        trainer_step_section(probe, trainer, device, ballast_bytes, flops_per_row, peak)
    if probe.has_time("lora_forward", 20 * row_seconds * sampling_rows + 10):
        lora_forward_section(probe, model, sampling_rows, size, text_tokens, device, dtype)
    if probe.has_time("update", 30 * row_seconds + 15):
        update_section(probe, model, size, text_tokens, device, dtype)
    # 4 phases of forward + backward (about 4 forwards each with checkpointing), 6 optimizer steps.
    if probe.has_time("update_phase", 16 * row_seconds * trainer.config.prompts_per_device + 15):
        update_phase_section(probe, trainer, size, text_tokens, device, dtype)
    if probe.has_time("sdpa", 20):
        sdpa_section(
            probe,
            sampling_rows,
            model.config.num_attention_heads,
            (size // 16) ** 2 + text_tokens,
            model.config.attention_head_dim,
            device,
            dtype,
        )
    if probe.has_time("vae_decode", 40):
        vae_decode_section(probe, pipeline.vae, (1,) if args.tiny else (1, 4, 16), size, device, dtype)
    # Last: compiling changes the model in place. About 2 minutes of compilation for FLUX.1-dev's two block types.
    if probe.has_time("forward_compiled", 120 + 10 * row_seconds * sampling_rows):
        compiled_forward_section(probe, model, sampling_rows, size, text_tokens, flops_per_row, peak, device, dtype)
    scratch.cleanup()
    probe.save()
    probe.append_row(results_md)
    print(
        json.dumps(
            {"section": "done", "t": round(probe.elapsed(), 1), "results": probe.path, "results_md": results_md}
        ),
        flush=True,
    )


def _as_list(entry):
    return entry if isinstance(entry, list) else [entry]


if __name__ == "__main__":
    main()
