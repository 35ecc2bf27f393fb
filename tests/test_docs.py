"""The documentation site: it builds without warnings, and its configuration reference is complete and current."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from trl_flow_egrpo import EGRPOConfig

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def load_docs_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(DOCS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=os.path.dirname(DOCS),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for page in ("index.html", "concepts/index.html", "configuration/index.html", "images/merge_plan.png"):
        assert (site / page).is_file(), page


def test_configuration_reference_lists_every_field_and_is_current():
    with open(os.path.join(DOCS, "configuration.md")) as handle:
        committed = handle.read()
    fix = "regenerate it: python docs/gen_config_reference.py"
    for field in dataclasses.fields(EGRPOConfig):
        assert f"| `{field.name}` |" in committed, f"docs/configuration.md lacks EGRPOConfig.{field.name}; {fix}"
    assert committed == load_docs_script("gen_config_reference").render(), f"docs/configuration.md is stale; {fix}"


def test_configuration_reference_does_not_depend_on_argument_parsing():
    """HfArgumentParser resolves the dataclass fields' string annotations in place (the example scripts build one);
    the page must read the same afterwards, whatever ran first in the process."""
    from transformers import HfArgumentParser

    before = load_docs_script("gen_config_reference").render()
    HfArgumentParser(EGRPOConfig)
    assert load_docs_script("gen_config_reference").render() == before


def test_merge_plan_figure_draws(tmp_path):
    pytest.importorskip("matplotlib")
    load_docs_script("make_figures").draw(str(tmp_path / "merge_plan.png"))
    with open(tmp_path / "merge_plan.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
