"""The model-card check of the conformance suite (``tests/test_conformance.py``): the card's snippet, run as written,
samples exactly what ``trainer.sample_images`` samples.

Each case saves a tiny base pipeline with ``save_pretrained`` (standing in for a Hub repository), builds a trainer on
it (loaded back from there) and perturbs the trained weights so that they matter, writes them and the card with
``trainer.push_to_hub`` (the upload stubbed out), executes the card's own Python block with only the two repository
ids replaced by the local folders, and compares the image (or video) it produces with ``trainer.sample_images`` for
the snippet's prompt and seed.
"""

import re

import numpy as np
import torch
from datasets import Dataset
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer, hub
from trl_flow_egrpo.rewards import ColorReward

TOLERANCE = 1e-5
BASE_ID, REPO_ID = "tiny-testing/base", "tiny-testing/egrpo-run"


def card_snippet(readme: str) -> str:
    """The Python block of a model card."""
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one Python block in the card, found {len(blocks)}"
    return blocks[0]


def perturb_trained_weights(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Add seeded noise to the trained weights (the LoRA, whose up-projections start at zero, or the whole
    transformer), so that the model the card loads differs from the base one and a snippet that lost the weights,
    or loads them at the wrong scale, fails."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def run_card_snippet(snippet: str, monkeypatch, workdir) -> torch.Tensor:
    """Execute ``snippet`` in ``workdir`` and return the float images ``[1, 3, H, W]`` (video: ``[F, 3, H, W]``) in
    [0, 1] its pipeline call produced, recorded where the pipeline turns it into PIL / numpy output (8-bit PIL
    images cannot be compared at 1e-5). ``export_to_video`` is stubbed: the mp4 writer's packages (imageio,
    OpenCV) are not test dependencies."""
    produced = []
    postprocess = VaeImageProcessor.postprocess

    def recording_postprocess(self, image, output_type="pil", *args, **kwargs):
        produced.append(postprocess(self, image, "pt", *args, **kwargs))
        return postprocess(self, image, output_type, *args, **kwargs)

    monkeypatch.setattr(VaeImageProcessor, "postprocess", recording_postprocess)
    monkeypatch.setattr("diffusers.utils.export_to_video", lambda frames, path, fps: None)
    monkeypatch.chdir(workdir)
    exec(compile(snippet, "model-card-snippet", "exec"), {})  # noqa: S102 - the card's own code is what is tested
    assert len(produced) == 1, f"the snippet decoded {len(produced)} outputs, expected one"
    return produced[0]


def card_snippet_difference(build_pipeline, config_overrides: dict, tmp_path, monkeypatch) -> float:
    """The largest absolute pixel difference between what the model card's snippet samples and
    ``trainer.sample_images`` for the snippet's prompt and seed, for the tiny pipeline ``build_pipeline(seed=0)``
    trained with ``EGRPOConfig(**config_overrides)`` (float32; the trained weights perturbed so that they matter)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    base = build_pipeline(seed=0)
    base.save_pretrained(base_dir)
    pipeline = type(base).from_pretrained(base_dir)
    pipeline.register_to_config(_name_or_path=BASE_ID)  # as if loaded from the Hub: the card names the base by id
    config = EGRPOConfig(
        output_dir=str(run_dir),
        hub_model_id=REPO_ID,
        num_inference_steps=4,
        num_active_steps=2,
        num_generations=2,
        prompts_per_device=1,
        max_steps=1,
        mixed_precision="no",
        lora_r=4,
        lora_alpha=8,
        save_steps=0,
        disable_tqdm=True,
        seed=0,
        **config_overrides,
    )
    # An image-editing family's snippet loads the user's source image: a picture of another size than the output.
    source = tmp_path / hub.USAGE_SOURCE_IMAGE
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(source)
    columns = {"prompt": ["a red apple"], "source_image": [str(source)]}
    trainer = EGRPOTrainer(config, pipeline, [ColorReward()], Dataset.from_dict(columns))
    prompt = hub.usage_prompt(trainer.adapter)
    images = [str(source)] if trainer.adapter.edits_images else None
    untrained = trainer.sample_images([prompt], seed=[hub.USAGE_SEED], images=images)[0]
    perturb_trained_weights(trainer.unwrapped_model)
    monkeypatch.setattr(hub, "upload_folder", lambda *args, **kwargs: "https://huggingface.co/commit")
    trainer.push_to_hub()  # the library's own save: the trained weights in diffusers' format and README.md

    snippet = card_snippet((run_dir / "README.md").read_text())
    assert f'"{BASE_ID}"' in snippet and f'"{REPO_ID}"' in snippet, snippet
    snippet = snippet.replace(f'"{BASE_ID}"', repr(str(base_dir))).replace(f'"{REPO_ID}"', repr(str(run_dir)))
    produced = run_card_snippet(snippet, monkeypatch, tmp_path)
    if not trainer.adapter.is_video:
        assert (tmp_path / "sample.png").is_file()  # the snippet ran to its end
        produced = produced.squeeze(0)

    expected = trainer.sample_images([prompt], seed=[hub.USAGE_SEED], images=images)[0]
    assert (untrained - expected).abs().max() > 1e3 * TOLERANCE, "the trained weights change nothing: nothing is tested"
    assert produced.shape == expected.shape, (produced.shape, expected.shape)
    return (produced.float() - expected).abs().max().item()


def check_card_snippet_reproduces_samples(build_pipeline, config_overrides: dict, tmp_path, monkeypatch) -> None:
    """The model card's snippet, executed as written (ids replaced by local folders), reproduces
    ``trainer.sample_images`` to :data:`TOLERANCE`: see :func:`card_snippet_difference`."""
    difference = card_snippet_difference(build_pipeline, config_overrides, tmp_path, monkeypatch)
    assert difference <= TOLERANCE, f"the card's snippet samples {difference:.2e} away from trainer.sample_images"
