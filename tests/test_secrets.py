"""No secret is ever written: the redaction rule (trl_flow_egrpo/redaction.py), then every writer of one tiny run
with a Hub token and a password in a URL: the checkpoint's trainer_state.json, the tensorboard (and wandb, offline)
files, the model card, the files uploaded with hub_strategy="every_save" (intercepted at the huggingface_hub API),
the log lines and the console; the token still reaches the Hub calls. Then the last line of defence: an upload
that would carry the token is refused."""

import contextlib
import importlib.util
import io
import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitInfo, HfApi, RepoUrl, constants
from huggingface_hub.utils import filter_repo_objects

from helpers import tiny_trainer
from trl_flow_egrpo import hub, tracking
from trl_flow_egrpo.adapters.flux import FluxAdapter
from trl_flow_egrpo.checkpoints import TrainerState, write_trainer_state
from trl_flow_egrpo.config import EGRPOConfig
from trl_flow_egrpo.redaction import REDACTED, is_secret_name, redact, redact_text

# Shaped like a real Hub token ("hf_" and 34 letters), so the text rule would catch it too, and distinctive enough
# that finding it anywhere is a leak, not a coincidence.
TOKEN = "hf_" + ("NeverWriteMe" * 3)[:34]
PASSWORD = "pw-NeverWriteMe-7"
URL_WITH_PASSWORD = f"https://alice:{PASSWORD}@tracker.example.com/runs/1"
SECRETS = (TOKEN.encode(), PASSWORD.encode())
REPO_ID = "someone/secret-egrpo"


def leaks(data: bytes) -> list[bytes]:
    """The secrets found in ``data``."""
    return [secret for secret in SECRETS if secret in data]


def files_with_secrets(root) -> dict[str, list[bytes]]:
    """Every file under ``root`` that holds a secret, with the secrets it holds."""
    found = {}
    for path in Path(root).rglob("*"):
        if path.is_file() and leaks(path.read_bytes()):
            found[str(path)] = leaks(path.read_bytes())
    return found


# ---------------------------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    "name",
    ["hub_token", "HF_TOKEN", "token", "hubtoken", "HFToken", "apiKey", "x-api-key", "api_key", "db_password",
     "passwd", "client_secret", "credentials", "Authorization", "aws.secret.access.key"],
)  # fmt: skip
def test_secret_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    ["prompt_column", "max_tokens", "tokenizer", "lora_target_modules", "monkey", "hub_private", "output_dir",
     "max_sequence_length", "keyframes", "tokens_per_second"],
)  # fmt: skip
def test_harmless_names(name):
    assert not is_secret_name(name)


def test_every_config_field_but_hub_token_is_written_as_it_is():
    """The rule costs the record of a run nothing: of all EGRPOConfig fields only hub_token has a secret name, and
    redacting a config with a value in every field changes hub_token alone."""
    assert [field.name for field in fields(EGRPOConfig) if is_secret_name(field.name)] == ["hub_token"]
    config = EGRPOConfig(
        hub_token=TOKEN,
        run_name="flux-hps",
        hub_model_id="someone/flux-egrpo",
        prompt_cache_dir="/data/cache",
        negative_prompt="blurry",
        reward_weights=[0.7, 0.3],
        resume_from_checkpoint="https://huggingface.co/someone/flux-egrpo",
    )
    raw, written = asdict(config), config.to_dict()
    assert written["hub_token"] == REDACTED
    assert {key: value for key, value in written.items() if key != "hub_token"} == {
        key: value for key, value in raw.items() if key != "hub_token"
    }


@pytest.mark.parametrize(
    "text, expected",
    [
        (URL_WITH_PASSWORD, "https://***@tracker.example.com/runs/1"),
        (f"https://{TOKEN}@github.com/a/b.git", "https://***@github.com/a/b.git"),
        ("postgresql://user:p@ss@db:5432/x", "postgresql://***@db:5432/x"),  # an unescaped "@" in the password
        ("http://host/a?api_key=abc&page=2", "http://host/a?api_key=***&page=2"),
        (f"push with {TOKEN}, then stop", "push with hf_***, then stop"),
        # Not secrets: a plain URL, an "@" in a path or query, a short or non-token "hf_" name.
        ("https://huggingface.co/someone/model", "https://huggingface.co/someone/model"),
        ("https://host/users/a@b.org?mail=a@b.org", "https://host/users/a@b.org?mail=a@b.org"),
        ("hf_hub_download and hf_transfer", "hf_hub_download and hf_transfer"),
    ],
)
def test_secret_looking_text_is_redacted(text, expected):
    assert redact_text(text) == expected


def test_redact_walks_nested_values_and_changes_nothing_in_place():
    value = {
        "service": {"url": URL_WITH_PASSWORD, "headers": {"Authorization": f"Bearer {PASSWORD}"}},
        "credentials": [{"user": "alice", "pin": 1234}],
        "db_password": 123456,  # a numeric password, as YAML reads it
        "hub_token": None,  # no token: stays readable
        "use_auth_token": True,  # a flag says whether, not what
        "steps": (1, 2),
        "note": f"token {TOKEN}",
    }
    original = json.loads(json.dumps(value))
    assert redact(value) == {
        "service": {"url": "https://***@tracker.example.com/runs/1", "headers": {"Authorization": REDACTED}},
        "credentials": [{"user": REDACTED, "pin": REDACTED}],
        "db_password": REDACTED,
        "hub_token": None,
        "use_auth_token": True,
        "steps": (1, 2),
        "note": "token hf_***",
    }
    assert json.loads(json.dumps(value)) == original


def test_the_config_keeps_its_token_but_never_shows_it():
    config = EGRPOConfig(hub_token=TOKEN, run_name=URL_WITH_PASSWORD)
    assert config.hub_token == TOKEN and config.run_name == URL_WITH_PASSWORD  # still usable for the Hub calls
    assert not leaks(json.dumps(config.to_dict()).encode())
    assert TOKEN not in repr(config) and TOKEN not in str(config)


def test_writers_redact_a_raw_config_too(tmp_path):
    """trainer_state.json, the tracker config and the model card redact what they are given, even a raw
    ``asdict`` that a caller forgot to redact."""
    raw = asdict(EGRPOConfig(hub_token=TOKEN, run_name=URL_WITH_PASSWORD))
    write_trainer_state(str(tmp_path), TrainerState(iteration=1), raw)
    saved = json.loads((tmp_path / "trainer_state.json").read_text())
    assert saved["config"]["hub_token"] == REDACTED and saved["config"]["max_steps"] == raw["max_steps"]
    assert not leaks((tmp_path / "trainer_state.json").read_bytes())

    flat = tracking.flat_config(raw)
    assert flat["hub_token"] == REDACTED and not leaks(yaml.safe_dump(flat).encode())
    assert tracking.tracker_init_kwargs(URL_WITH_PASSWORD, str(tmp_path))["wandb"]["name"] == redact_text(
        URL_WITH_PASSWORD
    )

    card = hub.build_model_card(
        base_model=None,
        repo_id=REPO_ID,
        config_dict=raw,
        merge_plan_table="",
        reward_names=["color"],
        reward_weights=[1.0],
        eval_reward_names=[],
        metrics={},
        image_grid_path=None,
        adapter=FluxAdapter,
        use_lora=True,
    )
    assert "run_name: https://***@tracker.example.com/runs/1" in card.content
    assert "hub_token" not in card.content and not leaks(card.content.encode())


# ---------------------------------------------------------------------------------------------- one tiny run


class CapturingHub:
    """Stands in for the Hub behind ``HfApi.whoami``, ``create_repo`` and ``upload_folder``: keeps the bytes of
    every uploaded file (by path in the repository) and the token of every call."""

    def __init__(self):
        self.uploaded: dict[str, bytes] = {}
        self.tokens: list[str | None] = []
        self.commits = 0

    def install(self, monkeypatch):
        fake = self
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; every call is faked

        def whoami(api, token=None, **kwargs):
            fake.tokens.append(api.token)
            return {"name": "someone", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(api, repo_id, **kwargs):
            fake.tokens.append(api.token)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, ignore_patterns=None, path_in_repo=None, **kwargs):
            fake.tokens.append(api.token)
            folder = Path(folder_path)
            files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
            for relative in filter_repo_objects(files, ignore_patterns=ignore_patterns):
                in_repo = f"{path_in_repo}/{relative}" if path_in_repo else relative
                fake.uploaded[in_repo] = (folder / relative).read_bytes()
            fake.commits += 1
            oid = f"{fake.commits:040x}"
            return CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                commit_message="",
                commit_description="",
                oid=oid,
            )

        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


class LogRecords(logging.Handler):
    """Every log record of every logger, formatted as a user's log file would have it."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One iteration with a checkpoint pushed to the Hub (hub_strategy="every_save", then the final push),
    logging to tensorboard and, when installed, wandb (offline), with a Hub token and a password in a URL."""
    pytest.importorskip("tensorboard")
    trackers = "tensorboard" + (",wandb" if importlib.util.find_spec("wandb") else "")
    tmp = tmp_path_factory.mktemp("secrets")
    records, root, package = LogRecords(), logging.getLogger(), logging.getLogger("trl_flow_egrpo")
    console = io.StringIO()
    # Earlier tests (accelerate's logging, caplog) can leave the package logger at a higher level or not
    # propagating: every record of the run must reach the handler whatever ran before.
    saved = root.level, package.level, package.propagate
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    package.setLevel(logging.DEBUG)
    package.propagate = True
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(console):
            with contextlib.redirect_stderr(console):
                monkeypatch.setenv("WANDB_DIR", str(tmp))
                monkeypatch.setenv("WANDB_MODE", "offline")
                fake = CapturingHub().install(monkeypatch)
                trainer = tiny_trainer(
                    tmp / "run",
                    max_steps=1,
                    save_steps=1,
                    log_with=trackers,
                    run_name=URL_WITH_PASSWORD,
                    push_to_hub=True,
                    hub_strategy="every_save",
                    hub_model_id=REPO_ID,
                    hub_token=TOKEN,
                )
                trainer.train()
    finally:
        root.removeHandler(records)
        root.setLevel(saved[0])
        package.setLevel(saved[1])
        package.propagate = saved[2]
    return tmp, trainer, fake, records.lines, console.getvalue(), trackers


def test_checkpoint_state_has_no_secret(run):
    tmp, trainer, *_ = run
    state_file = Path(trainer.config.output_dir) / "checkpoint-1" / "trainer_state.json"
    config = json.loads(state_file.read_text())["config"]
    assert config["hub_token"] == REDACTED and config["run_name"] == redact_text(URL_WITH_PASSWORD)
    assert not leaks(state_file.read_bytes())


def test_tracker_files_have_no_secret(run):
    tmp, trainer, _, _, _, trackers = run
    logs = Path(trainer.config.output_dir) / "logs"
    (hparams,) = logs.rglob("hparams.yml")
    assert yaml.safe_load(hparams.read_text())["hub_token"] == REDACTED
    events = list(logs.rglob("events.out.tfevents.*"))
    assert events and any(b"hub_token" in path.read_bytes() for path in events)  # the hparams are in them
    assert files_with_secrets(logs) == {}
    if "wandb" in trackers:
        (wandb_run,) = (tmp / "wandb").rglob("run-*.wandb")  # offline, the config is in the run file
        assert b"hub_token" in wandb_run.read_bytes() and b"https://***@tracker" in wandb_run.read_bytes()
        assert files_with_secrets(tmp / "wandb") == {}


def test_model_card_has_no_secret(run):
    _, trainer, fake, *_ = run
    card = (Path(trainer.config.output_dir) / "README.md").read_bytes()
    assert b"## Training configuration" in card and b"https://***@tracker.example.com" in card
    assert not leaks(card) and fake.uploaded["README.md"] == card


def test_uploads_have_no_secret_and_the_token_still_works(run):
    _, _, fake, *_ = run
    # The every_save push uploaded the checkpoint, trainer_state.json with its config included.
    assert "last-checkpoint/trainer_state.json" in fake.uploaded and "pytorch_lora_weights.safetensors" in fake.uploaded
    assert {path: leaks(data) for path, data in fake.uploaded.items() if leaks(data)} == {}
    assert fake.tokens and set(fake.tokens) == {TOKEN}  # every Hub call was made with the configured token


def test_logs_and_console_have_no_secret(run):
    _, _, _, lines, console, _ = run
    text = "\n".join(lines) + console
    assert any(line.startswith("INFO trl_flow_egrpo.") for line in lines)  # the trainer's start log was captured
    assert "iteration 1/1" in console  # and its summary line
    assert not leaks(text.encode())


def test_no_file_of_the_run_has_a_secret(run):
    tmp, *_ = run
    assert files_with_secrets(tmp) == {}


# ---------------------------------------------------------------------------------------------- the upload guard


def test_an_upload_that_would_carry_the_token_is_refused(tmp_path, monkeypatch):
    fake = CapturingHub().install(monkeypatch)
    folder = tmp_path / "out"
    (folder / "checkpoint-3").mkdir(parents=True)
    (folder / "README.md").write_text("a card")
    (folder / "checkpoint-3" / "notes.txt").write_text(TOKEN)  # never uploaded (ignored): no refusal
    assert hub.upload_folder(str(folder), REPO_ID, token=TOKEN).startswith("https://huggingface.co/")
    assert set(fake.uploaded) == {"README.md"}

    # The token across the boundary of two search blocks, in a file of a subfolder.
    monkeypatch.setattr(hub, "_SCAN_CHUNK_BYTES", 16)
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_bytes(b"x" * 10 + TOKEN.encode() + b"y" * 10)
    with pytest.raises(hub.HubError, match=r"transformer/config\.json contains the Hub token.*Nothing was uploaded"):
        hub.upload_folder(str(folder), REPO_ID, token=TOKEN)
    assert fake.commits == 1

    # The token from the environment (token=None) is searched for as well.
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(hub.HubError, match="contains the Hub token"):
        hub.upload_folder(str(folder), REPO_ID)
    assert fake.commits == 1
