"""Image-editing pipelines beyond the shared conformance checks (``tests/families.py`` runs those on FLUX.1 Kontext):
the dataset's source-image column (paths, PIL images, arrays) validated when the trainer is built, with errors that
name the problem and the fix; text-to-image pipelines ignoring it; rewards receiving the loaded sources through
``**columns``; the source image mattering to the sample; the prompt cache keyed by the source; the editing set's
generator reproducing the committed files."""

import importlib.util
import json
import os
from collections import UserList

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

import test_conformance as conformance
from card_snippet import check_card_snippet_reproduces_samples
from families import BASE_CONFIG, FAMILIES, QWENIMAGE_EDIT, check_recipe_states_its_merge_plan, source_images
from trl_flow_egrpo import EGRPOConfig, EGRPOTrainer
from trl_flow_egrpo.quantization import precompute_run_prompts
from trl_flow_egrpo.rewards import ColorReward
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDIT_FAMILIES = [family for family in FAMILIES.values() if family.edits_images] + [QWENIMAGE_EDIT]
EVERY_EDIT_FAMILY = pytest.mark.parametrize("family", EDIT_FAMILIES, ids=lambda family: family.id)
PROMPTS = ["make it red", "add a hat"]


def make_trainer(family, tmp_path, columns: dict, reward=None, **overrides):
    """An EGRPOTrainer of ``family``'s tiny pipeline on a dataset with ``columns``."""
    values = dict(BASE_CONFIG, output_dir=str(tmp_path / "run"), height=family.size, width=family.size)
    values.update(max_sequence_length=family.sequence_length, **family.config)
    values.update(overrides)
    return EGRPOTrainer(EGRPOConfig(**values), family.build(), [reward or ColorReward()], _rows(columns))


def _rows(columns: dict) -> UserList:
    # An indexable collection of dict rows (the trainer keeps it as it is): values of mixed types stay what they are,
    # where a datasets.Dataset would need one type per column.
    return UserList(dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True))


def image_file(tmp_path, name: str, mode: str = "RGB", size=(20, 12)) -> str:
    """A PNG of ``mode`` under ``tmp_path``; its path."""
    path = tmp_path / name
    Image.new(mode, size, "red" if mode != "L" else 128).save(path)
    return str(path)


@EVERY_EDIT_FAMILY
def test_bad_source_images_are_clear_errors_at_init(family, tmp_path):
    pipeline = type(family.build()).__name__
    with pytest.raises(ValueError, match=f"train_dataset has no source-image column 'source_image'.*{pipeline} edits"):
        make_trainer(family, tmp_path, {"prompt": PROMPTS})
    with pytest.raises(ValueError, match="no source-image column 'picture'.*set EGRPOConfig.image_column"):
        make_trainer(
            family, tmp_path, {"prompt": PROMPTS, "source_image": source_images(PROMPTS, 8, 8)}, image_column="picture"
        )
    good = image_file(tmp_path, "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    gray = image_file(tmp_path, "gray.png", mode="L")
    cases = [
        (str(tmp_path / "missing.png"), r"is the path .*missing.png', which does not exist\. Fix the path"),
        (str(tmp_path / "broken.png"), r"is the file .*broken.png', which PIL cannot read .*Replace the file"),
        (gray, r"is the file .*gray.png', a L image, not RGB\. Convert it to RGB first"),
        (Image.new("RGBA", (8, 8)), r"is a RGBA PIL image, not RGB\. Convert it to RGB first"),
        (None, r"is None \(NoneType\)\. Give a file path, an RGB PIL image or an RGB array"),
        (np.zeros((3, 8, 8), np.uint8), r"is an array of shape \(3, 8, 8\), not .*array.transpose\(1, 2, 0\)"),
        (np.full((8, 8, 3), 2.0), r"is a float array with values outside \[0, 1\]\. Scale it"),
        (np.full((8, 8, 3), 300), r"is a int64 array; give uint8 values 0-255"),
    ]
    for value, message in cases:
        with pytest.raises(
            ValueError, match="train_dataset: the source image in column 'source_image' of row 1 " + message
        ):
            make_trainer(family, tmp_path, {"prompt": PROMPTS, "source_image": [good, value]})
    # The eval dataset is checked too.
    with pytest.raises(ValueError, match="eval_dataset has no source-image column"):
        values = dict(BASE_CONFIG, output_dir=str(tmp_path / "run"), height=family.size, width=family.size)
        EGRPOTrainer(
            EGRPOConfig(**values),
            family.build(),
            [ColorReward()],
            Dataset.from_dict({"prompt": PROMPTS, "source_image": [good, good]}),
            eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        )


def test_a_text_to_image_pipeline_ignores_the_image_column(tmp_path):
    trainer = EGRPOTrainer(
        EGRPOConfig(**dict(BASE_CONFIG, output_dir=str(tmp_path), height=64, width=64, max_sequence_length=32)),
        build_tiny_flux_pipeline(),
        [ColorReward()],
        Dataset.from_dict({"prompt": PROMPTS, "source_image": ["no such file", "nor this"]}),
    )
    assert trainer.iteration_rows(0)[0]["source_image"] in ("no such file", "nor this")  # not loaded
    with pytest.raises(ValueError, match="FluxPipeline generates from text alone: pass no source images"):
        trainer.sample_images(PROMPTS, images=source_images(PROMPTS, 8, 8))


@EVERY_EDIT_FAMILY
def test_paths_pil_images_and_arrays_are_the_same_source(family, tmp_path):
    size = family.size
    (image,) = source_images(PROMPTS[:1], size // 2, size)  # another size than the output: resized
    path = str(tmp_path / "source.png")
    image.save(path)
    array = np.asarray(image)
    forms = {"path": path, "pil": image, "uint8": array, "float": array / 255.0, "lists": array.tolist()}
    trainer = make_trainer(family, tmp_path, {"prompt": PROMPTS[:1], "source_image": [path]})
    samples = {name: trainer.sample_images(PROMPTS[:1], seed=3, images=[value]) for name, value in forms.items()}
    for name, sample in samples.items():
        torch.testing.assert_close(sample, samples["path"], rtol=0, atol=1e-6, msg=name)
    # The source matters: another source, another edit (an adapter that dropped it would fail here). The tiny
    # Qwen-Image-Edit's sample barely moves (7e-5): its velocity is checked instead (test_qwenimage_edit_guidance...).
    if family is not QWENIMAGE_EDIT:
        other = trainer.sample_images(PROMPTS[:1], seed=3, images=[255 - array])  # the negative of the source
        assert (other - samples["path"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="edits a source image per prompt: pass images=\\[...\\], one per prompt"):
        trainer.sample_images(PROMPTS[:1], seed=3)


@EVERY_EDIT_FAMILY
def test_rewards_receive_the_loaded_source_images_as_a_column(family, tmp_path):
    seen = []

    def recording_reward(images, prompts, **columns):
        seen.append(columns)
        return ColorReward()(images, prompts)

    sources = source_images(PROMPTS, 8, 12)
    paths = []
    for index, image in enumerate(sources):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    trainer = make_trainer(
        family,
        tmp_path,
        {"prompt": PROMPTS, "source_image": paths, "edit_mask": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]},
        reward=recording_reward,
        shuffle_dataset=False,
    )
    trainer.step()
    (columns,) = seen
    masks = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    rows = [masks.index(mask) for mask in columns["edit_mask"]]  # each image's dataset row, by its other column
    assert sorted(set(rows)) == [0, 1] and len(rows) == len(columns["source_image"])
    for row, source in zip(rows, columns["source_image"], strict=True):
        assert isinstance(source, Image.Image) and source.mode == "RGB"
        assert np.array_equal(np.asarray(source), np.asarray(sources[row]))  # the row's own source, as loaded


@EVERY_EDIT_FAMILY
def test_the_prompt_cache_is_keyed_by_the_source_image(family, tmp_path):
    sources = source_images(["a", "b"], family.size, family.size)
    trainer = make_trainer(
        family,
        tmp_path,
        {"prompt": PROMPTS[:1], "source_image": sources[:1]},
        prompt_cache_dir=str(tmp_path / "cache"),
    )
    encoder = trainer.prompt_encoder
    first = encoder([PROMPTS[0], PROMPTS[0]], sources)  # one prompt, two sources: two entries
    assert encoder.num_encoded == 2
    again = encoder([PROMPTS[0]], sources[1:])
    assert encoder.num_encoded == 2  # from the cache
    for name, tensor in again.items():
        torch.testing.assert_close(tensor, first[name][1:], rtol=0, atol=0)
    differs = [name for name in first if not torch.equal(first[name][0], first[name][1])]
    assert differs, "the two sources' conditioning is the same: the source image was not encoded"


@EVERY_EDIT_FAMILY
def test_precomputing_the_runs_prompts_covers_their_source_images(family, tmp_path):
    # The train command warms the cache before training: training must then encode nothing.
    paths = []
    for index, image in enumerate(source_images(PROMPTS, 8, 8)):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    columns = {"prompt": PROMPTS, "source_image": paths}
    trainer = make_trainer(family, tmp_path, columns, prompt_cache_dir=str(tmp_path / "cache"), max_steps=2)
    assert precompute_run_prompts(trainer) == 2  # two (prompt, source) pairs over both iterations
    trainer.step()
    assert trainer.prompt_encoder.num_encoded == 2


def test_the_edit_set_generator_rewrites_the_committed_files(tmp_path, monkeypatch):
    folder = os.path.join(REPO, "examples", "prompts")
    spec = importlib.util.spec_from_file_location("make_edit_prompts", os.path.join(folder, "make_edit_prompts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", str(tmp_path))
    monkeypatch.setattr(module, "SOURCES", str(tmp_path / "edit_sources"))
    module.main()
    pairs = {}
    for name in ("edit_train.jsonl", "edit_test.jsonl"):
        assert (tmp_path / name).read_text() == open(os.path.join(folder, name)).read()
        rows = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        # (shape, target colour): the shape is the source file's last word, the colour the instruction's.
        pairs[name] = {(row["source_image"].rsplit("_", 1)[1][:-4], row["prompt"].split()[-1]) for row in rows}
    assert not pairs["edit_train.jsonl"] & pairs["edit_test.jsonl"]  # the test edits are held out
    written = sorted(os.listdir(tmp_path / "edit_sources"))
    assert written == sorted(os.listdir(os.path.join(folder, "edit_sources")))
    for name in written:
        committed = np.asarray(Image.open(os.path.join(folder, "edit_sources", name)))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "edit_sources" / name)), committed), name


# Qwen-Image-Edit's shared checks (it is not in FAMILIES: each check takes minutes, see families.QWENIMAGE_EDIT), run
# with the conformance suite's own check functions.


@pytest.mark.slow
@pytest.mark.parametrize("case", QWENIMAGE_EDIT.parity, ids=lambda case: case.id)
def test_qwenimage_edit_anchor_trajectory_is_the_pipelines_sample(case):
    conformance.test_anchor_trajectory_is_the_pipelines_sample(QWENIMAGE_EDIT, case)


@pytest.mark.slow
@torch.no_grad()
def test_qwenimage_edit_guidance_and_source_change_the_velocity():
    # What the parity check cannot see on this tiny model (see families.QWENIMAGE_EDIT): relative changes of the
    # velocity measured 5e-4 (guidance 4 -> 6), 8e-4 (other sources, seen by the text encoder and as tokens) and 0.13
    # (the source's tokens zeroed).
    pipe = QWENIMAGE_EDIT.build()
    adapter = QWENIMAGE_EDIT.adapter(pipe, guidance_scale=4.0, negative_prompt=" ")
    conditioning = QWENIMAGE_EDIT.encode(adapter, PROMPTS)
    latents = adapter.initial_noise(len(PROMPTS), torch.Generator().manual_seed(0))
    timesteps = adapter.schedule(4, None).timesteps[:1].repeat(len(PROMPTS))
    velocity = adapter.velocity(pipe.transformer, latents, timesteps, conditioning)
    stronger = QWENIMAGE_EDIT.adapter(pipe, guidance_scale=6.0, negative_prompt=" ")
    no_source = dict(conditioning, image_latents=torch.zeros_like(conditioning["image_latents"]))
    other_sources = adapter.encode_prompts(PROMPTS, source_images(["another", "source"], 32, 32))
    for other, at_least in (
        (stronger.velocity(pipe.transformer, latents, timesteps, conditioning), 1e-4),
        (adapter.velocity(pipe.transformer, latents, timesteps, other_sources), 1e-4),
        (adapter.velocity(pipe.transformer, latents, timesteps, no_source), 1e-2),
    ):
        assert (other - velocity).norm() / velocity.norm() > at_least


@pytest.mark.slow
def test_qwenimage_edit_is_registered_and_draws_the_pipelines_noise():
    conformance.test_adapter_is_registered_and_draws_the_pipelines_noise(QWENIMAGE_EDIT)


@pytest.mark.slow
@pytest.mark.parametrize("case", QWENIMAGE_EDIT.on_policy, ids=lambda case: case.id)
def test_qwenimage_edit_on_policy_ratios_are_one(tmp_path, case):
    conformance.test_on_policy_ratios_are_one(tmp_path, QWENIMAGE_EDIT, case)


@pytest.mark.slow
def test_qwenimage_edit_training_raises_the_reward(tmp_path):
    conformance.test_training_raises_the_reward(tmp_path, QWENIMAGE_EDIT)


@pytest.mark.slow
def test_qwenimage_edit_saved_lora_loads_into_a_fresh_pipeline(tmp_path):
    conformance.test_saved_lora_loads_into_a_fresh_pipeline(tmp_path, QWENIMAGE_EDIT)


@pytest.mark.slow
def test_qwenimage_edit_card_snippet_reproduces_the_trainers_samples(tmp_path, monkeypatch):
    ((_, overrides),) = QWENIMAGE_EDIT.card
    check_card_snippet_reproduces_samples(QWENIMAGE_EDIT.build, overrides, tmp_path, monkeypatch)


def test_qwenimage_edit_bad_input_and_recipe(tmp_path):
    conformance.test_bad_input_is_a_clear_error(tmp_path, QWENIMAGE_EDIT)
    check_recipe_states_its_merge_plan(QWENIMAGE_EDIT, QWENIMAGE_EDIT.recipe, conformance_script_arguments())


def conformance_script_arguments():
    """``examples/hpd.py``'s argument class, which parses the recipes."""
    spec = importlib.util.spec_from_file_location("hpd", os.path.join(REPO, "examples", "hpd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScriptArguments
