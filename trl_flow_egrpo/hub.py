"""Hugging Face Hub: checking the Hub before training, the model card of an E-GRPO run, uploading it, and
downloading checkpoints back.

With ``push_to_hub`` the trainer calls :func:`preflight` when it is built, so a missing token, offline mode
or an unreachable Hub fails before the first rollout rather than after hours of training.
:meth:`EGRPOTrainer.push_to_hub <trl_flow_egrpo.EGRPOTrainer.push_to_hub>` saves the model and the eval
grid into ``output_dir``, writes ``README.md`` with :func:`build_model_card` and uploads the folder with
:func:`upload_folder`; a failed upload says where the model is saved and how to upload it later.
:func:`download_checkpoint` fetches a pushed repository to resume from it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, get_token, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .redaction import is_secret_name, redact
from .registry import describe_reward


class HubError(RuntimeError):
    """The Hub cannot be used for this run (offline, no token, unreachable, no write access) or an upload
    failed; the message names the cause and the fix."""


_HOW_TO_LOG_IN = (
    "log in with `hf auth login`, set the HF_TOKEN environment variable, or pass hub_token "
    "(a token with write access from https://huggingface.co/settings/tokens)"
)
_OR_NO_PUSH = "or set push_to_hub=False to train without uploading"

DEFAULT_IGNORE_PATTERNS = ("checkpoint-*/**", "logs/**", "*.tmp/**")
"""What :func:`upload_folder` leaves out of ``output_dir`` by default: resumable checkpoints (optimizer
state, many GB when fully fine-tuning), tracker logs and interrupted checkpoint saves."""

USAGE_IMAGE_PROMPT = "a photo of an astronaut riding a horse"
"""The prompt of the model card's snippet for an image family."""
USAGE_VIDEO_PROMPT = "a cat walking on the beach"
"""The prompt of the model card's snippet for a video family."""
USAGE_EDIT_PROMPT = "turn it into a watercolor painting"
"""The prompt of the model card's snippet for an image-editing family (FLUX.1 Kontext, Qwen-Image-Edit)."""
USAGE_SOURCE_IMAGE = "source.png"
"""The source image the snippet of an image-editing family loads (the user's own)."""


def usage_prompt(adapter) -> str:
    """The prompt of the model card's snippet for ``adapter``'s family: a video, an edit or an image prompt."""
    if adapter.is_video:
        return USAGE_VIDEO_PROMPT
    return USAGE_EDIT_PROMPT if adapter.edits_images else USAGE_IMAGE_PROMPT


USAGE_SEED = 0
"""The snippet samples what ``trainer.sample_images([prompt], seed=USAGE_SEED)`` returns."""

_SCAN_CHUNK_BYTES = 8 * 2**20
"""Files are searched for the token in blocks of this size (the memory :func:`find_secret` needs)."""

# Licenses of well-known base models: a fine-tune is a derivative and inherits them.
_BASE_LICENSES = {
    "black-forest-labs/FLUX.1-dev": dict(
        license="other",
        license_name="flux-1-dev-non-commercial-license",
        license_link="https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md",
    ),
    "black-forest-labs/FLUX.1-schnell": dict(license="apache-2.0"),
    "stabilityai/stable-diffusion-3.5-medium": dict(
        license="other",
        license_name="stabilityai-ai-community",
        license_link="https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md",
    ),
    "stabilityai/stable-diffusion-3.5-large": dict(
        license="other",
        license_name="stabilityai-ai-community",
        license_link="https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md",
    ),
}

CITATION = """@article{zhang2026egrpo,
  title   = {E-GRPO: High Entropy Steps Drive Effective Reinforcement Learning for Flow Models},
  author  = {Zhang, Shengjun and Zhang, Zhang and Dai, Chensheng and Duan, Yueqi},
  journal = {arXiv preprint arXiv:2601.00423},
  year    = {2026}
}"""

_FRAMEWORKS = (
    "trl-flow-egrpo",
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "huggingface_hub",
)

_TEMPLATE = """---
{{ card_data }}
---

# {{ repo_id }}

{{ model_kind }} of {{ base_model_text }} trained with **E-GRPO** (entropy-aware GRPO,
[arXiv 2601.00423](https://arxiv.org/abs/2601.00423)) with `trl-flow-egrpo`, for {{ max_steps }}
iterations. The weights derive from the base model and are subject to its license.

## Usage

```python
{{ usage }}
```

The snippet samples what `trainer.sample_images([prompt], seed={{ seed }})` samples, with the training
schedule ({{ schedule }}), guidance, prompt length, size and initial noise (up to rounding: a bfloat16
pipeline keeps its latents in bfloat16 between steps, the trainer in float32). A plain `pipe(prompt)`
{{ plain_load }} applies the same learned weights but samples with the pipeline's own defaults (its
schedule, guidance and prompt length), so its images differ. Other step counts and shifts work too, but
this schedule is the one the policy was optimized for.

## Rewards

Rewards are combined with `reward_aggregation: {{ reward_aggregation }}`.

| reward | weight | what it is |
|---|---|---|
{% for row in reward_rows -%}
| `{{ row.name }}` | {{ row.weight }} | {{ row.source }} |
{% endfor %}
{% if eval_rows -%}
Evaluated, never trained on:

| eval reward | what it is |
|---|---|
{% for row in eval_rows -%}
| `{{ row.name }}` | {{ row.source }} |
{% endfor %}
{%- endif %}

## Merge plan

E-GRPO trains only the stochastic steps of this plan: each one starts at schedule index `k` of the
deterministic anchor trajectory and spans `l` intervals, merged until its entropy `exp(h)` reaches
`tau = {{ entropy_threshold }}`; `num_generations = {{ num_generations }}` rollouts branch off per step and
prompt, and their rewards are normalized within that group.

{{ merge_plan_table }}

## Evaluation

{% if metric_rows -%}
Final evaluation: deterministic (ODE) samples of the eval prompts from fixed seeds.

| metric | mean | std |
|---|---|---|
{% for row in metric_rows -%}
| {{ row.name }} | {{ row.mean }} | {{ row.std }} |
{% endfor %}
{%- else -%}
No evaluation was run (pass an `eval_dataset` and set `eval_steps`, or call `trainer.evaluate()`).
{%- endif %}

{% if image_grid_path -%}
![Evaluation samples]({{ image_grid_path }})
{%- endif %}

## Training configuration

<details>
<summary>Full <code>EGRPOConfig</code></summary>

```yaml
{{ config_yaml }}
```

</details>

## Framework versions

{% for name, version in versions -%}
- {{ name }}: {{ version }}
{% endfor %}
## Citation

```bibtex
{{ citation }}
```
"""


def build_model_card(
    *,
    base_model: str | None,
    repo_id: str,
    config_dict: dict,
    merge_plan_table: str,
    reward_names: list[str],
    reward_weights: list[float],
    eval_reward_names: list[str],
    metrics: dict[str, float],
    image_grid_path: str | None,
    adapter,
    use_lora: bool,
) -> ModelCard:
    """The model card (``README.md``) of an E-GRPO run.

    Args:
        base_model: Hub id or local path of the pipeline that was fine-tuned, or None when the pipeline was
            built in memory (then the card says so and loads the weights onto "your base pipeline").
        repo_id: the Hub repository the model is pushed to (used in the usage snippet).
        config_dict: ``EGRPOConfig.to_dict()``; shown in full, except secrets: fields with a secret name
            (``hub_token``) are left out and secret-looking text is redacted
            (:func:`~trl_flow_egrpo.redaction.redact`), whether or not the caller redacted it.
        merge_plan_table: the Markdown table of :func:`~trl_flow_egrpo.format_merge_plan`.
        reward_names: logged names of the training rewards (``hps_v2.1``, ``clip_score``, ...).
        reward_weights: one weight per training reward.
        eval_reward_names: logged names of the evaluation-only rewards.
        metrics: final evaluation metrics, ``eval/<reward>/mean`` and ``eval/<reward>/std`` (as returned by
            ``EGRPOTrainer.evaluate``); empty when no evaluation was run.
        image_grid_path: path of the eval image grid relative to the uploaded folder, or None.
        adapter: the run's model adapter (class or instance, :class:`~trl_flow_egrpo.adapters.ModelAdapter`):
            its ``family`` is a tag, its pipeline's class (a class: its first ``pipeline_class_names`` entry) and
            its ``transformer_class_name`` are the classes of the usage snippet, and its ``card_call_arguments``
            and ``sampling_scheduler_code`` make the snippet sample as the trainer did. An instance also gives the
            snippet the dtype the base pipeline was loaded in (a class: bfloat16).
        use_lora: True when the repository holds a LoRA (``pytorch_lora_weights.safetensors``), False when
            it holds a fully fine-tuned ``transformer/``.

    Returns:
        A ``huggingface_hub.ModelCard`` with YAML metadata (base_model when it is a Hub id, library_name,
        tags, pipeline_tag, and the license of well-known base models, ``other`` for the rest) and sections:
        usage, rewards (weights, checkpoints), merge plan, evaluation metrics, sample grid, full config,
        framework versions, citation.
    """
    if len(reward_weights) != len(reward_names):
        raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_names)} rewards.")
    on_hub = base_model is not None and _is_hub_id(base_model)
    tags = ["trl-flow-egrpo", "e-grpo", "text-to-image", "diffusers-training", "diffusers", adapter.family]
    if use_lora:
        tags.append("lora")
    card_data = ModelCardData(
        base_model=base_model if on_hub else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=tags,
        **_BASE_LICENSES.get(base_model, {"license": "other"}),
    )

    config = {key: value for key, value in redact(config_dict).items() if not is_secret_name(key)}
    shift = config.get("shift")
    schedule = f"{config.get('num_inference_steps')} steps, " + (
        f"static shift {shift}" if shift is not None else "the scheduler's own shift"
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        repo_id=repo_id,
        base_model_text=_base_model_text(base_model, _pipeline_class_name(adapter)),
        model_kind="A LoRA" if use_lora else "A full fine-tune",
        plain_load="after `load_lora_weights`" if use_lora else "with the fine-tuned transformer",
        max_steps=config.get("max_steps"),
        schedule=schedule,
        seed=USAGE_SEED,
        usage=_usage(base_model, repo_id, adapter, use_lora, config),
        reward_aggregation=config.get("reward_aggregation"),
        reward_rows=[
            {"name": name, "weight": f"{weight:g}", "source": describe_reward(name)}
            for name, weight in zip(reward_names, reward_weights, strict=True)
        ],
        eval_rows=[{"name": name, "source": describe_reward(name)} for name in eval_reward_names],
        entropy_threshold=config.get("entropy_threshold"),
        num_generations=config.get("num_generations"),
        merge_plan_table=merge_plan_table,
        metric_rows=_metric_rows(metrics),
        image_grid_path=image_grid_path,
        config_yaml=yaml.safe_dump(config, sort_keys=False).strip(),
        versions=[(name, _version(name)) for name in _FRAMEWORKS],
        citation=CITATION,
    )


def preflight(repo_id: str, *, token: str | None, private: bool) -> str:
    """Check, before any training, that the model can be pushed to ``repo_id``, and create the repository.

    The checks fail with a :class:`HubError` that names the Hub, the repository and the fix:
    offline mode (``HF_HUB_OFFLINE``), no token (argument, ``HF_TOKEN`` or the ``hf auth login`` token),
    an unreachable Hub, a rejected or read-only token, or a repository that cannot be created.

    Args:
        repo_id: ``"namespace/name"``, or ``"name"`` for the token owner's namespace.
        token: Hub token; ``None`` uses ``HF_TOKEN`` or the token stored by ``hf auth login``.
        private: create the repository as private (an existing repository keeps its visibility).

    Returns:
        The full repository id, ``"namespace/name"``.
    """
    where = f"the Hugging Face Hub ({constants.ENDPOINT})"
    if constants.HF_HUB_OFFLINE:
        raise HubError(
            f"push_to_hub=True, but {where} is disabled in this process: HF_HUB_OFFLINE (or "
            f"TRANSFORMERS_OFFLINE) is set. Unset it to push to '{repo_id}', {_OR_NO_PUSH}."
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(
            f"push_to_hub=True, but '{repo_id}' is not a valid Hub repository id ({error}). Set "
            f"hub_model_id to 'namespace/name' (letters, digits, '-', '_', '.'), {_OR_NO_PUSH}."
        ) from error
    token = token or get_token()
    if token is None:
        raise HubError(f"push_to_hub=True, but no token for {where} was found: {_HOW_TO_LOG_IN}; {_OR_NO_PUSH}.")
    api = HfApi(token=token)
    try:
        identity = api.whoami()
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise HubError(
                f"push_to_hub=True, but {where} rejected the token (401: invalid or expired): "
                f"{_HOW_TO_LOG_IN}; {_OR_NO_PUSH}."
            ) from error
        raise HubError(
            f"push_to_hub=True, but {where} answered with an error when checking the token: {error}. "
            f"Retry later, {_OR_NO_PUSH}."
        ) from error
    except Exception as error:  # noqa: BLE001 - any transport failure (DNS, proxy, TLS, timeout) means the same
        raise HubError(
            f"push_to_hub=True, but {where} cannot be reached ({type(error).__name__}: {error}). "
            f"Check the network connection and proxy (HF_ENDPOINT if you use a mirror), "
            f"{_OR_NO_PUSH}."
        ) from error
    role = identity.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":
        raise HubError(
            f"push_to_hub=True, but the token of '{identity.get('name')}' is read-only: {where} needs "
            f"a token with write access to create '{repo_id}'; {_HOW_TO_LOG_IN}; {_OR_NO_PUSH}."
        )
    full_id = repo_id if "/" in repo_id else f"{identity['name']}/{repo_id}"
    try:
        return api.create_repo(full_id, private=private, exist_ok=True).repo_id
    except Exception as error:  # noqa: BLE001 - permission, quota, name clash: the Hub's message says which
        raise HubError(
            f"push_to_hub=True, but the repository '{full_id}' cannot be created on {where} "
            f"({type(error).__name__}: {error}). Check that the token's owner '{identity.get('name')}' "
            f"may write to that namespace, choose another hub_model_id, {_OR_NO_PUSH}."
        ) from error


LAST_CHECKPOINT = "last-checkpoint"
"""Folder of the model repository that ``hub_strategy="every_save"`` pushes each new checkpoint to."""


def upload_folder(
    folder: str,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload E-GRPO model",
    ignore_patterns: list[str] | None = None,
    path_in_repo: str | None = None,
) -> str:
    """Create the model repository ``repo_id`` if needed and upload ``folder`` to it in one commit.

    Args:
        folder: the directory to upload (an ``output_dir`` with the model, ``README.md`` and eval grid).
        repo_id: ``"user/name"`` (or ``"name"`` for the token's own namespace).
        private: create the repository as private (an existing repository keeps its visibility).
        token: Hub token; ``None`` uses the logged-in token or ``HF_TOKEN``.
        commit_message: the commit's message.
        ignore_patterns: glob patterns of files not to upload; ``None`` means
            :data:`DEFAULT_IGNORE_PATTERNS` (checkpoints, logs, interrupted saves).
        path_in_repo: upload into this folder of the repository (default: its root).

    Returns:
        The URL of the commit.

    Raises:
        HubError: when a file to upload contains the Hub token (nothing is uploaded; the message names the
            file, see :func:`find_secret`), or when the upload fails; its message then says that the files stay
            in ``folder`` and gives the ``hf upload`` command that uploads them later.
    """
    ignore = list(DEFAULT_IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    # Checked before anything is sent, and outside the try below: its recovery command would upload the file.
    secret = token or get_token()
    leaking = find_secret(folder, files_to_upload(folder, ignore), secret) if secret else None
    if leaking is not None:
        raise HubError(
            f"Refusing to upload {os.path.abspath(folder)} to the Hugging Face Hub repository '{repo_id}': "
            f"{leaking} contains the Hub token in use, and the repository may be public. Nothing was uploaded. "
            "Remove the token from that file (trl-flow-egrpo writes configs with secrets redacted: did a script "
            "of yours print or save it?) or leave the file out with ignore_patterns; if the file was shared, "
            "revoke the token at https://huggingface.co/settings/tokens."
        )
    try:
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        # A copy: HfApi.upload_folder appends its own patterns to the list it is given, in place.
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            ignore_patterns=list(ignore),
            path_in_repo=path_in_repo,
        )
    except Exception as error:  # noqa: BLE001 - whatever failed, the files are safe on disk: say how to retry
        command = upload_command(folder, repo_id, ignore, private=private, path_in_repo=path_in_repo)
        raise HubError(
            f"Uploading to the Hugging Face Hub repository '{repo_id}' failed "
            f"({type(error).__name__}: {error}).\nNothing is lost: the files are saved locally in "
            f"{os.path.abspath(folder)}. Upload them later with:\n\n"
            f"    {command}\n"
        ) from error
    return str(commit.commit_url)


def files_to_upload(folder: str, ignore_patterns: list[str]) -> list[str]:
    """The files of ``folder`` (paths relative to it, with ``/``) that :func:`upload_folder` uploads: all but
    those matching ``ignore_patterns`` (globs as ``HfApi.upload_folder`` matches them). Sorted."""
    relative = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )
    return list(filter_repo_objects(relative, ignore_patterns=list(ignore_patterns)))


def find_secret(folder: str, relative_paths: list[str], secret: str) -> str | None:
    """The first of ``relative_paths`` (files of ``folder``) whose bytes contain ``secret``, or None.

    Every byte of every file is searched (in blocks of 8 MiB that overlap by ``len(secret) - 1`` bytes, so
    a match across a block boundary is found): the upload hashes every file anyway, so the search at most
    doubles the reading, which is small next to sending the files. Secrets shorter than 8 characters are not
    searched for (they would match by chance; Hub tokens are 37 characters).
    """
    needle = secret.encode()
    if len(needle) < 8:
        return None
    for relative in relative_paths:
        with open(os.path.join(folder, relative), "rb") as handle:
            carried = b""
            while block := handle.read(_SCAN_CHUNK_BYTES):
                window = carried + block
                if needle in window:
                    return relative
                carried = window[-(len(needle) - 1) :]
    return None


def upload_command(
    folder: str, repo_id: str, ignore_patterns: list[str], *, private: bool = False, path_in_repo: str | None = None
) -> str:
    """The ``hf upload`` shell command that uploads ``folder`` as :func:`upload_folder` does.

    ``hf`` since huggingface_hub 1.0 takes one pattern per ``--exclude``; the argparse CLI before it took
    all patterns after a single ``--exclude`` (and kept only the last of repeated ones).
    """
    if _major_version("huggingface_hub") >= 1:
        excludes = [part for pattern in ignore_patterns for part in ("--exclude", pattern)]
    else:
        excludes = ["--exclude", *ignore_patterns] if ignore_patterns else []
    words = ["hf", "upload", repo_id, os.path.abspath(folder), path_in_repo or ".", *excludes]
    return " ".join(shlex.quote(word) for word in words) + (" --private" if private else "")


def download_checkpoint(
    repo_id: str, subfolder: str = LAST_CHECKPOINT, revision: str | None = None, token: str | None = None
) -> str:
    """Download a checkpoint pushed to the Hub and return its local directory.

    With ``hub_strategy="every_save"`` the trainer pushes each new checkpoint to the ``last-checkpoint/``
    folder of the model repository; resume on another machine with::

        config.resume_from_checkpoint = download_checkpoint("user/flux-egrpo")
        EGRPOTrainer(config, ...).train()

    Args:
        repo_id: the model repository.
        subfolder: the checkpoint's folder in the repository (``""``: the repository root).
        revision: branch, tag or commit (default: the main branch).
        token: Hub token for private repositories.
    """
    allow = [f"{subfolder}/**"] if subfolder else None
    return os.path.join(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=allow), subfolder)


def _base_model_text(base_model: str | None, pipeline_class: str) -> str:
    """How the card's first sentence names the base model: a Hub link, a local path, or a built pipeline."""
    if base_model is None:
        return (
            f"a base `{pipeline_class}` that was built in memory (it has no Hub id or path, so load the "
            "weights onto that same pipeline)"
        )
    if _is_hub_id(base_model):
        return f"[`{base_model}`](https://huggingface.co/{base_model})"
    return f"the local pipeline `{base_model}`"


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` looks like a Hub repository id (``org/name``) rather than a local path or class name."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not os.path.exists(name)


def _pipeline_class_name(adapter) -> str:
    """The class of the pipeline the snippet loads: an adapter instance's own pipeline's (FLUX.2 [klein] is
    ``Flux2KleinPipeline``, not its family's first class), else the family's first ``pipeline_class_names``."""
    pipeline = getattr(adapter, "pipeline", None)
    if pipeline is not None:
        for klass in type(pipeline).__mro__:
            if klass.__name__ in adapter.pipeline_class_names:
                return klass.__name__
    return adapter.pipeline_class_names[0]


def _usage_dtype(adapter) -> str:
    """The snippet's ``torch_dtype``: the dtype the base pipeline was loaded in (read from its VAE, which training
    never casts; the transformer holds float32 trained weights), or bfloat16 for an adapter class."""
    pipeline = getattr(adapter, "pipeline", None)
    return str(pipeline.vae.dtype) if pipeline is not None else "torch.bfloat16"


def _usage(base_model: str | None, repo_id: str, adapter, use_lora: bool, config: dict) -> str:
    """The card's Python snippet: load the base pipeline (or, when it was built in memory, start from the
    user's own), put the trained weights in, and sample what ``trainer.sample_images([prompt], seed=USAGE_SEED)``
    samples: the training schedule (``adapter.sampling_scheduler_code``), the family's call arguments
    (``adapter.card_call_arguments``) and the trainer's initial noise, which a CPU generator seeded ``USAGE_SEED``
    draws in the pipeline as in the trainer. The device is chosen when the snippet runs; a video family saves an
    mp4."""
    pipeline_class, transformer_class = _pipeline_class_name(adapter), adapter.transformer_class_name
    dtype = _usage_dtype(adapter)
    scheduler = adapter.sampling_scheduler_code(config.get("shift"))
    imports = ["FlowMatchEulerDiscreteScheduler"] if scheduler else []
    if not use_lora:
        imports.append(transformer_class)
    if base_model is not None:
        imports.append(pipeline_class)
    lines = [*adapter.card_imports, "import torch"]
    lines += [f"from diffusers import {', '.join(imports)}"] if imports else []
    if adapter.is_video:
        lines.append("from diffusers.utils import export_to_video")
    if adapter.edits_images:
        lines.append("from diffusers.utils import load_image")
    lines += ["", 'device = "cuda" if torch.cuda.is_available() else "cpu"']
    if not use_lora:
        lines.append(
            f'transformer = {transformer_class}.from_pretrained("{repo_id}", subfolder="transformer", '
            f"torch_dtype={dtype})"
        )
    if base_model is None:
        lines.append(
            f"pipe = ...  # your base {pipeline_class}: the one this model was trained from (it was built in memory)"
        )
        lines.append(f'pipe.load_lora_weights("{repo_id}")' if use_lora else "pipe.transformer = transformer")
    elif use_lora:
        lines += [
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", torch_dtype={dtype})',
            f'pipe.load_lora_weights("{repo_id}")',
        ]
    else:
        lines.append(
            f'pipe = {pipeline_class}.from_pretrained("{base_model}", transformer=transformer, torch_dtype={dtype})'
        )
    if scheduler:
        lines += ["# The schedule the model was trained with:", f"pipe.scheduler = {scheduler}"]
    lines.append("pipe.to(device)")
    if adapter.edits_images:
        lines.append(f'source_image = load_image("{USAGE_SOURCE_IMAGE}")  # the image to edit')
    prompt, output = usage_prompt(adapter), "video" if adapter.is_video else "image"
    lines += [
        f"# The trainer's sample_images([prompt], seed={USAGE_SEED}): its noise comes from a CPU generator.",
        f"{output} = pipe(",
        f"    prompt={json.dumps(prompt)},",
        *(f"    {name}={code}," for name, code in adapter.card_call_arguments(config).items()),
        f'    generator=torch.Generator("cpu").manual_seed({USAGE_SEED}),',
    ]
    if adapter.is_video:
        lines += [").frames[0]", 'export_to_video(video, "sample.mp4", fps=16)']
    else:
        lines += [").images[0]", 'image.save("sample.png")']
    return "\n".join(lines)


def _metric_rows(metrics: dict[str, float]) -> list[dict]:
    """``eval/<name>/mean`` and ``eval/<name>/std`` pairs as table rows; other metrics as rows of their own."""
    rows: dict[str, dict] = {}
    for key, value in metrics.items():
        match = re.fullmatch(r"eval/(.+)/(mean|std)", key)
        name, stat = match.groups() if match else (key, "mean")
        rows.setdefault(name, {"name": name, "mean": "", "std": ""})[stat] = f"{value:.4f}"
    return list(rows.values())


def _major_version(distribution: str) -> int:
    """The major version number of an installed distribution."""
    return int(importlib.metadata.version(distribution).split(".")[0])


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
