"""The Hub integration: the preflight check at construction (against a local HTTP stand-in of the Hub, a
refused port and the real offline mode), model card, upload (intercepted at the huggingface_hub API), a failed
upload's recovery command (run through the real `hf` CLI), load back, resume."""

import json
import os
import shlex
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from datasets import Dataset
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.cli.hf import app as hf_cli
from huggingface_hub.utils import filter_repo_objects
from peft import get_peft_model_state_dict

from helpers import PROMPTS, tiny_trainer
from trl_flow_egrpo import format_merge_plan, hub, plan_merges, shifted_sigmas
from trl_flow_egrpo.adapters.flux import FluxAdapter
from trl_flow_egrpo.adapters.sd3 import SD3Adapter
from trl_flow_egrpo.config import EGRPOConfig
from trl_flow_egrpo.rewards import BrightnessReward
from trl_flow_egrpo.tiny import build_tiny_flux_pipeline

REPO_ID = "someone/tiny-egrpo"
TOKEN = "hf_not_a_real_token"
ENV_TOKEN = "hf_token_from_the_environment"
IDENTITY = {"name": "someone", "auth": {"accessToken": {"role": "write"}}}


def go_online(monkeypatch):
    """Undo the suite's HF_HUB_OFFLINE=1 for one test; the test fakes every Hub call it makes."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def no_stored_token(monkeypatch, tmp_path):
    """No HF_TOKEN and no `hf auth login` token file."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))


class FakeHub:
    """Stands in for the Hub behind ``HfApi.whoami``, ``HfApi.create_repo``, ``HfApi.upload_folder`` and
    ``snapshot_download``: repositories are directories under ``root``, and every call is recorded. Installing
    it lifts the suite's offline mode and sets ``HF_TOKEN`` (the token of ``IDENTITY``)."""

    def __init__(self, root: Path, fail_uploads: bool = False):
        self.root = root
        self.fail_uploads = fail_uploads
        self.calls = []

    def install(self, monkeypatch):
        fake = self
        go_online(monkeypatch)
        monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)

        def whoami(api, token=None, **kwargs):
            fake.calls.append(("whoami", None, {"token": api.token}))
            return IDENTITY

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            fake.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok, "token": api.token}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(
            api,
            *,
            repo_id,
            folder_path,
            commit_message=None,
            allow_patterns=None,
            ignore_patterns=None,
            path_in_repo=None,
            **kwargs,
        ):
            # Like the real method: extend the caller's pattern list in place, then filter relative paths.
            if fake.fail_uploads:
                raise ConnectionError("the connection was reset")
            ignore_patterns += [".git/**"]
            files = [
                path.relative_to(folder_path).as_posix() for path in Path(folder_path).rglob("*") if path.is_file()
            ]
            uploaded = sorted(
                filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
            )
            for relative in uploaded:
                target = fake.root / repo_id / (path_in_repo or "") / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(folder_path) / relative, target)
            fake.calls.append(
                ("upload_folder", repo_id, {"message": commit_message, "files": uploaded, "token": api.token})
            )
            oid = f"{len(fake.calls):040x}"
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                commit_message=commit_message,
                commit_description="",
                oid=oid,
            )

        def snapshot_download(repo_id, revision=None, token=None, allow_patterns=None, **kwargs):
            fake.calls.append(("snapshot_download", repo_id, {"revision": revision}))
            return str(fake.root / repo_id)

        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
        return self


class LocalHub(ThreadingHTTPServer):
    """A Hub stand-in on 127.0.0.1 answering the requests of ``HfApi.whoami`` and ``HfApi.create_repo``, so the
    preflight runs huggingface_hub's real HTTP code. ``whoami`` and ``create`` are the (status, JSON body) it
    answers; ``requests`` records (method, path, Authorization header, JSON payload)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _LocalHubHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.whoami = (200, IDENTITY)
        self.create = (200, None)  # None: the URL of the created repository
        self.requests = []


class _LocalHubHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/api/whoami-v2":
            self._answer(*self.server.whoami)
        else:  # repo_info, which create_repo asks after a refused creation: the repository does not exist
            self._answer(404, {"error": "Repository not found"})

    def do_POST(self):  # noqa: N802
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, body = self.server.create
        self._answer(status, body or {"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"}, payload)

    def _answer(self, status, body, payload=None):
        self.server.requests.append((self.command, self.path, self.headers.get("Authorization"), payload))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(monkeypatch):
    """The LocalHub, serving as the Hub endpoint of this test (offline mode lifted, HF_TOKEN unset)."""
    server = LocalHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    go_online(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def unreachable_hub(monkeypatch):
    """A Hub endpoint that refuses connections: a local port bound but not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    go_online(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{sock.getsockname()[1]}")
    yield
    sock.close()


def test_preflight_creates_the_repo_in_the_token_owners_namespace(local_hub):
    assert hub.preflight("tiny-egrpo", token=TOKEN, private=True) == "someone/tiny-egrpo"
    (_, whoami, auth, _), (method, create, create_auth, payload) = local_hub.requests
    assert whoami == "/api/whoami-v2" and auth == create_auth == f"Bearer {TOKEN}"
    assert (method, create) == ("POST", "/api/repos/create")
    assert payload["organization"] == "someone" and payload["name"] == "tiny-egrpo"
    assert payload.get("private") is True or payload.get("visibility") == "private"


def test_preflight_falls_back_on_hf_token(local_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    assert hub.preflight(REPO_ID, token=None, private=False) == REPO_ID
    assert {auth for _, _, auth, _ in local_hub.requests} == {f"Bearer {ENV_TOKEN}"}


@pytest.mark.parametrize(
    "whoami, create, expected",
    [
        ((401, {"error": "Invalid credentials in Authorization header"}), (200, None), "rejected the token"),
        ((200, {"name": "someone", "auth": {"accessToken": {"role": "read"}}}), (200, None), "read-only"),
        (
            (200, IDENTITY),
            (403, {"error": "You don't have the rights to create a model under this namespace"}),
            f"'{REPO_ID}' cannot be created",
        ),
    ],
)
def test_preflight_refuses_a_token_that_cannot_push(local_hub, whoami, create, expected):
    local_hub.whoami, local_hub.create = whoami, create
    with pytest.raises(hub.HubError, match=expected) as failure:
        hub.preflight(REPO_ID, token=TOKEN, private=False)
    assert local_hub.url in str(failure.value) and "push_to_hub=False" in str(failure.value)


def test_preflight_names_the_cause_and_the_fix(unreachable_hub, tmp_path, monkeypatch):
    with pytest.raises(hub.HubError, match="cannot be reached.*ConnectError.*push_to_hub=False"):
        hub.preflight(REPO_ID, token=TOKEN, private=False)
    with pytest.raises(hub.HubError, match="not a valid Hub repository id.*hub_model_id"):
        hub.preflight("my run", token=TOKEN, private=False)
    no_stored_token(monkeypatch, tmp_path)
    with pytest.raises(hub.HubError, match="no token .*hf auth login.*HF_TOKEN.*hub_token.*push_to_hub=False"):
        hub.preflight(REPO_ID, token=None, private=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE.*Unset it.*push_to_hub=False"):
        hub.preflight(REPO_ID, token=TOKEN, private=False)


def _offline(request, monkeypatch, tmp_path):
    """The suite's real offline mode (conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported)."""
    assert constants.HF_HUB_OFFLINE


def _no_token(request, monkeypatch, tmp_path):
    go_online(monkeypatch)
    no_stored_token(monkeypatch, tmp_path)


def _unreachable(request, monkeypatch, tmp_path):
    request.getfixturevalue("unreachable_hub")
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)


def _rejected_token(request, monkeypatch, tmp_path):
    request.getfixturevalue("local_hub").whoami = (401, {"error": "Invalid credentials in Authorization header"})
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)


@pytest.mark.parametrize(
    "situation, expected",
    [
        (_offline, "HF_HUB_OFFLINE"),
        (_no_token, "no token"),
        (_unreachable, "cannot be reached"),
        (_rejected_token, "rejected the token"),
    ],
)
def test_trainer_checks_the_hub_before_any_model_work(situation, expected, request, monkeypatch, tmp_path):
    situation(request, monkeypatch, tmp_path)
    pipeline = build_tiny_flux_pipeline(seed=0)
    with pytest.raises(hub.HubError, match=expected):
        tiny_trainer(tmp_path / "run", pipeline=pipeline, push_to_hub=True, hub_model_id=REPO_ID)
    assert not hasattr(pipeline.transformer, "peft_config")  # failed before the LoRA was even added


def test_trainer_resolves_the_repo_namespace_at_construction(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote").install(monkeypatch)
    trainer = tiny_trainer(tmp_path / "run", push_to_hub=True, hub_model_id="tiny-egrpo", hub_private=True)
    assert trainer.hub_repo_id == "someone/tiny-egrpo"
    assert fake.calls == [
        ("whoami", None, {"token": ENV_TOKEN}),
        ("create_repo", "someone/tiny-egrpo", {"private": True, "exist_ok": True, "token": ENV_TOKEN}),
    ]


def test_a_failed_push_says_where_the_model_is_and_how_to_upload_it(tmp_path, monkeypatch):
    FakeHub(tmp_path / "remote", fail_uploads=True).install(monkeypatch)
    output_dir = tmp_path / "run"
    trainer = tiny_trainer(output_dir, max_steps=1, save_steps=1, push_to_hub=True, hub_model_id=REPO_ID)
    with pytest.raises(hub.HubError, match="the connection was reset") as failure:
        trainer.train()
    message = str(failure.value)
    assert f"saved locally in {output_dir}" in message
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file() and (output_dir / "checkpoint-1").is_dir()

    # The one command of the message, run through the real `hf` CLI against a working Hub, uploads what
    # push_to_hub would have uploaded: the model and its card, not the checkpoints.
    (command,) = [line.strip() for line in message.splitlines() if line.strip().startswith("hf upload ")]
    working = FakeHub(tmp_path / "remote").install(monkeypatch)
    result = CliRunner().invoke(hf_cli, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    hub.upload_folder(str(output_dir), "someone/reference")
    by_cli, reference = [call for call in working.calls if call[0] == "upload_folder"]
    assert by_cli[1] == REPO_ID and by_cli[2]["files"] == reference[2]["files"]
    assert "pytorch_lora_weights.safetensors" in by_cli[2]["files"]
    assert not [path for path in by_cli[2]["files"] if path.startswith("checkpoint-")]


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """One tiny run, end to end: train 1 iteration with evaluation and a checkpoint, then push_to_hub."""
    tmp = tmp_path_factory.mktemp("hub")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many times faster than 2 threads on a busy 2-core machine
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            fake = FakeHub(tmp / "remote").install(monkeypatch)
            trainer = tiny_trainer(
                tmp / "run",
                max_steps=1,
                save_steps=1,
                eval_steps=1,
                eval_dataset=Dataset.from_dict({"prompt": PROMPTS[:4]}),
                eval_reward_fns=[BrightnessReward()],
                push_to_hub=True,
                hub_model_id=REPO_ID,
                hub_private=True,
                hub_token=TOKEN,
            )
            fake.at_construction = list(fake.calls)
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    lora = {name: value.detach().clone() for name, value in get_peft_model_state_dict(trainer.unwrapped_model).items()}
    return fake, trainer, lora


def test_push_to_hub_uploads_a_loadable_lora_with_its_card(pushed):
    fake, trainer, lora = pushed
    # The preflight, at construction: the token is checked and the repository created before any rollout.
    assert [call[0] for call in fake.at_construction] == ["whoami", "create_repo"]
    assert fake.at_construction[0][2] == {"token": TOKEN}
    assert fake.at_construction[1][2] == {"private": True, "exist_ok": True, "token": TOKEN}
    uploads = [call for call in fake.calls[len(fake.at_construction) :] if call[0] == "upload_folder"]
    assert len(uploads) == 1 and uploads[0][1] == REPO_ID
    uploaded = uploads[0][2]["files"]
    assert uploads[0][2]["token"] == TOKEN
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
    # The tiny pipeline was built in memory: no made-up Hub id, no dead link.
    assert 'from_pretrained("FluxPipeline"' not in card.text and "(#)" not in card.text
    assert "built in memory" in card.text and f'pipe.load_lora_weights("{REPO_ID}")' in card.text
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
    for relative in (
        "README.md",
        "pytorch_lora_weights.safetensors",
        "checkpoint-5/optimizer.bin",
        "checkpoint-6.tmp/optimizer.bin",
        "logs/events.out",
        "transformer/config.json",
    ):
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
        base_model="black-forest-labs/FLUX.1-dev",
        repo_id="someone/flux-egrpo",
        config_dict=EGRPOConfig(hub_token=TOKEN, reward_weights=[0.7, 0.3]).to_dict(),
        merge_plan_table=format_merge_plan(plan_merges(sigmas, 0.7, 2.2, 8), sigmas),
        reward_names=["hps_v2.1", "clip_score"],
        reward_weights=[0.7, 0.3],
        eval_reward_names=["pickscore"],
        metrics={"eval/hps_v2.1/mean": 0.391, "eval/hps_v2.1/std": 0.01, "eval/pickscore/mean": 23.2},
        image_grid_path="eval_grid.png",
        adapter=FluxAdapter,
        use_lora=True,
    )
    values.update(overrides)
    return hub.build_model_card(**values)


def test_model_card_has_every_section():
    card = _card()
    assert card.data.base_model == "black-forest-labs/FLUX.1-dev"
    assert card.data.pipeline_tag == "text-to-image"
    assert card.data.license_name == "flux-1-dev-non-commercial-license"
    for heading in (
        "## Usage",
        "## Rewards",
        "## Merge plan",
        "## Evaluation",
        "## Training configuration",
        "## Framework versions",
        "## Citation",
    ):
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
    assert "the local pipeline `/models/my-flux`" in card.text and "(#)" not in card.text


def test_model_card_of_a_pipeline_built_in_memory():
    lora = _card(base_model=None)
    assert lora.data.base_model is None and lora.data.license == "other"
    assert "built in memory" in lora.text and "(#)" not in lora.text
    assert "pipe = ...  # your base FluxPipeline" in lora.text
    assert 'pipe.load_lora_weights("someone/flux-egrpo")' in lora.text and ".from_pretrained(" not in lora.text
    full = _card(base_model=None, use_lora=False)
    assert 'FluxTransformer2DModel.from_pretrained("someone/flux-egrpo", subfolder="transformer"' in full.text
    assert "pipe.transformer = transformer" in full.text and "FluxPipeline.from_pretrained" not in full.text


def test_model_card_takes_the_classes_from_the_adapter():
    card = _card(adapter=SD3Adapter, base_model="stabilityai/stable-diffusion-3.5-medium", use_lora=False)
    assert "sd3" in card.data.tags and "flux" not in card.data.tags
    assert 'SD3Transformer2DModel.from_pretrained("someone/flux-egrpo"' in card.text
    assert (
        'StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-medium", transformer=' in card.text
    )
    assert card.data.license_name == "stabilityai-ai-community"


def test_model_card_calls_the_pipeline_with_the_familys_arguments():
    from trl_flow_egrpo.adapters.qwenimage import QwenImageAdapter
    from trl_flow_egrpo.adapters.wan import WanAdapter

    qwen = _card(
        adapter=QwenImageAdapter,
        base_model="Qwen/Qwen-Image",
        config_dict=EGRPOConfig(guidance_scale=4.0, shift=None).to_dict(),
    )
    # Qwen-Image's guidance is true_cfg_scale, and its negative pass runs only when a negative prompt is given.
    assert "true_cfg_scale=4.0" in qwen.text and "negative_prompt=''" in qwen.text
    assert "guidance_scale" not in qwen.text.split("```python")[1].split("```")[0]
    assert "pipe.scheduler =" not in qwen.text  # no static shift: the pipeline's own scheduler

    wan = _card(
        adapter=WanAdapter,
        base_model="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        config_dict=EGRPOConfig(num_frames=33, shift=None, negative_prompt="blurry").to_dict(),
    )
    # The trainer samples Euler steps; the released Wan scheduler is UniPC.
    assert (
        "pipe.scheduler = FlowMatchEulerDiscreteScheduler("
        "num_train_timesteps=pipe.scheduler.config.num_train_timesteps, shift=pipe.scheduler.config.flow_shift)"
    ) in wan.text
    assert "num_frames=33" in wan.text and "negative_prompt='blurry'" in wan.text
    assert ".frames[0]" in wan.text and 'export_to_video(video, "sample.mp4"' in wan.text
    assert ".images[0]" not in wan.text

    flux = _card().text.split("```python")[1].split("```")[0]  # the snippet
    assert "shift=3.0, use_dynamic_shifting=False" in flux  # static shift 3.0: the Euler scheduler with that shift
    assert "negative_prompt" not in flux  # FLUX.1 has no negative pass
    # What a plain call would take from the pipeline's defaults is explicit: the adapter's guidance, the prompt length.
    assert "    guidance_scale=3.5,\n    max_sequence_length=512,\n" in flux
    assert 'device = "cuda" if torch.cuda.is_available() else "cpu"' in flux and "pipe.to(device)" in flux
    assert 'generator=torch.Generator("cpu").manual_seed(0)' in flux


def test_every_save_pushes_the_checkpoint_and_resumes_from_it(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote").install(monkeypatch)
    trainer = tiny_trainer(
        tmp_path / "run", max_steps=2, save_steps=1, push_to_hub=True, hub_model_id=REPO_ID, hub_strategy="every_save"
    )
    trainer.train()
    uploads = [call for call in fake.calls if call[0] == "upload_folder"]
    assert len(uploads) == 5  # model + checkpoint at iterations 1 and 2, then the final model
    assert (fake.root / REPO_ID / "last-checkpoint" / "trainer_state.json").is_file()
    assert (fake.root / REPO_ID / "pytorch_lora_weights.safetensors").is_file()

    path = hub.download_checkpoint(REPO_ID)
    resumed = tiny_trainer(tmp_path / "elsewhere", max_steps=2, resume_from_checkpoint=path)
    resumed.load_checkpoint(path)
    assert resumed.state.iteration == 2
