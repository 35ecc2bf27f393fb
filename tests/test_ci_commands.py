"""CI runs the README's test command: .ci/run and the GitHub workflow install what the README's command installs
(the deepspeed extra included, so that the DeepSpeed tests run instead of skipping), and check that deepspeed
imports before the tests."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_test_command() -> str:
    """The one-line command of the README's "Set up and run the tests" block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("**Set up and run the tests**", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, flags=re.S).group(1).strip()


def test_readme_test_command_installs_the_dev_and_deepspeed_extras():
    command = readme_test_command()
    venv, install, pytest_run = command.split(" && ")
    assert venv == "python3 -m venv .venv" and pytest_run == ".venv/bin/python -m pytest -q"
    assert install.endswith('-e ".[dev,deepspeed]"'), install


def test_ci_runs_the_readme_test_command_and_requires_deepspeed():
    venv, install, pytest_run = readme_test_command().split(" && ")
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert f"{venv} && {install}" in run, ".ci/run must install the main venv with the README's command"
    assert pytest_run in run
    assert (
        run.index(f"{venv} && {install}") < run.index('.venv/bin/python -c "import deepspeed"') < run.index(pytest_run)
    )
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert f"run: {install}" in workflow, "the workflow must install with the README's command"
    assert 'run: .venv/bin/python -c "import deepspeed"' in workflow and f"run: {pytest_run}" in workflow
