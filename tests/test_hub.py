"""The Hub integration: model card, upload (intercepted at the huggingface_hub API), load back, resume."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import PROMPTS, tiny_trainer
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import filter_repo_objects
from peft import get_peft_model_state_dict

from trl_flow_egrpo import format_merge_plan, hub, plan_merges, shifted_sigmas
from trl_flow_egrpo.config import EGRPOConfig
from trl_flow_egrpo.rewards import BrightnessReward
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

REPO_ID = "someone/tiny-egrpo"
TOKEN = "hf_not_a_real_token"


class FakeHub:
    """Stands in for the Hub behind ``HfApi.create_repo``, ``HfApi.upload_folder`` and ``snapshot_download``:
    repositories are directories under ``root``, and every call is recorded."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []

    def install(self, monkeypatch):
        fake = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            fake.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok,
                                                        "token": api.token}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, allow_patterns=None,
                          ignore_patterns=None, path_in_repo=None, **kwargs):
            # Like the real method: extend the caller's pattern list in place, then filter relative paths.
            ignore_patterns += [".git/**"]
            files = [path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*")
                     if path.is_file()]
            uploaded = sorted(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                  ignore_patterns=ignore_patterns))
            for relative in uploaded:
                target = fake.root / repo_id / (path_in_repo or "") / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(folder_path) / relative, target)
            fake.calls.append(("upload_folder", repo_id, {"message": commit_message, "files": uploaded,
                                                          "token": api.token}))
            oid = f"{len(fake.calls):040x}"
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                              commit_message=commit_message, commit_description="", oid=oid)

        def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, **kwargs):
            fake.calls.append(("snapshot_download", repo_id, {"revision": revision}))
            return str(fake.root / repo_id)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
        return self


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One tiny run, end to end: train 1 iteration with evaluation and a checkpoint, then push_to_hub."""
    tmp = tmp_path_factory.mktemp("hub")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many times faster than 2 threads on a busy 2-core machine
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            fake = FakeHub(tmp / "remote").install(monkeypatch)
            trainer = tiny_trainer(tmp / "run", max_steps=1, save_steps=1, eval_steps=1,
                                   eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
                                   eval_reward_fns=[BrightnessReward()], push_to_hub=True, hub_model_id=REPO_ID,
                                   hub_private=True, hub_token=TOKEN)
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    lora = {name: value.detach().clone() for name, value in get_peft_model_state_dict(trainer.unwrapped_model).items()}
    return fake, trainer, lora


def test_push_to_hub_uploads_a_loadable_lora_with_its_card(pushed):
    fake, trainer, lora = pushed
    assert [call[0] for call in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][2] == {"private": True, "exist_ok": True, "token": TOKEN}
    uploaded = fake.calls[1][2]["files"]
    assert fake.calls[1][2]["token"] == TOKEN
    # The model, its card and the eval grid; never the checkpoints or the tracker logs.
    assert {"README.md", "pytorch_lora_weights.safetensors", "eval_grid.png"} <= set(uploaded)
    assert os.path.isdir(os.path.join(trainer.config.output_dir, "checkpoint-1"))
    assert not [path for path in uploaded if path.startswith(("checkpoint-", "logs/"))]

    remote = fake.root / REPO_ID
    pipeline = build_tiny_flux_pipeline(seed=0)
    pipeline.load_lora_weights(str(remote))
    loaded = get_peft_model_state_dict(pipeline.transformer, adapter_name="default_0")
    assert loaded.keys() == lora.keys()
    for name, tensor in lora.items():
        torch.testing.assert_close(loaded[name], tensor, msg=name)

    card = ModelCard.load(remote / "README.md")
    assert card.data.library_name == "diffusers"
    assert {"trl-flow-egrpo", "e-grpo", "lora", "flux"} <= set(card.data.tags)
    final_eval = trainer.state.eval_history[-1]
    assert f"| brightness | {final_eval['eval/brightness/mean']:.4f} |" in card.text
    assert "![Evaluation samples](eval_grid.png)" in card.text
    assert format_merge_plan(trainer.merge_plan, trainer.schedule.sigmas) in card.text
    assert TOKEN not in card.content


def test_resume_from_a_checkpoint_on_the_hub(pushed, tmp_path, monkeypatch):
    fake, trainer, lora = pushed
    fake = FakeHub(fake.root).install(monkeypatch)
    hub.upload_folder(os.path.join(trainer.config.output_dir, "checkpoint-1"), f"{REPO_ID}-checkpoint")
    path = hub.download_checkpoint(f"{REPO_ID}-checkpoint", subfolder="")

    resumed = tiny_trainer(tmp_path, max_steps=1)
    resumed.load_checkpoint(path)
    assert resumed.state.iteration == 1
    restored = get_peft_model_state_dict(resumed.unwrapped_model)
    for name, tensor in lora.items():
        torch.testing.assert_close(restored[name], tensor, msg=name)


def test_upload_folder_filters_and_returns_the_commit_url(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote").install(monkeypatch)
    folder = tmp_path / "out"
    for relative in ("README.md", "pytorch_lora_weights.safetensors", "checkpoint-5/optimizer.bin",
                     "checkpoint-6.tmp/optimizer.bin", "logs/events.out", "transformer/config.json"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text("x")

    url = hub.upload_folder(str(folder), "someone/run", commit_message="first")
    url_again = hub.upload_folder(str(folder), "someone/run")
    everything = hub.upload_folder(str(folder), "someone/all", ignore_patterns=[])

    uploads = [call[2] for call in fake.calls if call[0] == "upload_folder"]
    assert uploads[0]["files"] == ["README.md", "pytorch_lora_weights.safetensors", "transformer/config.json"]
    assert uploads[1]["files"] == uploads[0]["files"]  # the defaults survive HfApi extending the list
    assert len(uploads[2]["files"]) == 6
    assert uploads[0]["message"] == "first"
    assert url.startswith("https://huggingface.co/someone/run/commit/") and url != url_again
    assert everything.startswith("https://huggingface.co/someone/all/commit/")


def _card(**overrides):
    sigmas = shifted_sigmas(16, 3.0)
    values = dict(
        base_model="black-forest-labs/FLUX.1-dev", repo_id="someone/flux-egrpo",
        config_dict=EGRPOConfig(hub_token=TOKEN, reward_weights=[0.7, 0.3]).to_dict(),
        merge_plan_table=format_merge_plan(plan_merges(sigmas, 0.7, 2.2, 8), sigmas),
        reward_names=["hps_v2.1", "clip_score"], reward_weights=[0.7, 0.3], eval_reward_names=["pickscore"],
        metrics={"eval/hps_v2.1/mean": 0.391, "eval/hps_v2.1/std": 0.01, "eval/pickscore/mean": 23.2},
        image_grid_path="eval_grid.png", model_family="Flux", use_lora=True)
    values.update(overrides)
    return hub.build_model_card(**values)


def test_model_card_has_every_section():
    card = _card()
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev"
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.license_name == "flux-1-dev-non-commercial-license"
    for heading in ("## Usage", "## Rewards", "## Merge plan", "## Evaluation", "## Training configuration",
                    "## Framework versions", "## Citation"):
        assert heading in card.text, heading
    assert 'pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev"' in card.text
    assert 'pipe.load_lora_weights("someone/flux-egrpo")' in card.text
    assert "shift=3.0, use_dynamic_shifting=False" in card.text
    assert "| `hps_v2.1` | 0.7 | HPSv2.1: open_clip ViT-H-14, checkpoint `HPS_v2.1_compressed.pt`" in card.text
    assert "| `clip_score` | 0.3 |" in card.text and "| `pickscore` | PickScore v1" in card.text
    assert "| 7 | 7 | 3 | 0.7941 -> 0.6429 | 2.210 |" in card.text  # METHOD.md's plan at tau 2.2
    assert "| hps_v2.1 | 0.3910 | 0.0100 |" in card.text and "| pickscore | 23.2000 |  |" in card.text
    assert "entropy_threshold: 2.2" in card.text and "reward_weights:\n- 0.7\n- 0.3" in card.text
    assert TOKEN not in card.content and "hub_token" not in card.text
    assert "arXiv:2601.00423" in card.text and "Shengjun" in card.text
    assert "- diffusers: " in card.text and "- trl-flow-egrpo: " in card.text


def test_model_card_for_full_fine_tuning_and_local_models():
    card = _card(use_lora=False, base_model="/models/my-flux", metrics={}, image_grid_path=None)
    assert "lora" not in card.data.tags and card.data.base_model is None  # not a Hub id
    assert 'FluxTransformer2DModel.from_pretrained("someone/flux-egrpo", subfolder="transformer"' in card.text
    assert "load_lora_weights" not in card.text and "![" not in card.text
    assert "No evaluation was run" in card.text


def test_every_save_pushes_the_checkpoint_and_resumes_from_it(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote").install(monkeypatch)
    trainer = tiny_trainer(tmp_path / "run", max_steps=2, save_steps=1, push_to_hub=True, hub_model_id=REPO_ID,
                           hub_strategy="every_save")
    trainer.train()
    uploads = [call for call in fake.calls if call[0] == "upload_folder"]
    assert len(uploads) == 5  # model + checkpoint at iterations 1 and 2, then the final model
    assert (fake.root / REPO_ID / "last-checkpoint" / "trainer_state.json").is_file()
    assert (fake.root / REPO_ID / "pytorch_lora_weights.safetensors").is_file()

    path = hub.download_checkpoint(REPO_ID)
    resumed = tiny_trainer(tmp_path / "elsewhere", max_steps=2, resume_from_checkpoint=path)
    resumed.load_checkpoint(path)
    assert resumed.state.iteration == 2
