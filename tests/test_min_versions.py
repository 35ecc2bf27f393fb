"""ci/min-versions.txt, the constraints of CI's lowest-versions environment, must say what pyproject.toml says.

CI installs the package with those constraints into .venv-min and runs the unit tests there (.ci/run), so a
lower bound in pyproject.toml is a version that CI has tested only while the two files agree.
"""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
# CI installs the one torch/torchvision pair this machine has (.ci/run); their lower bounds are not tested.
NOT_CONSTRAINED = {"torch", "torchvision"}


def declared_lower_bounds() -> dict[str, Version]:
    """``name -> version`` of every ``>=`` bound of the core dependencies and the ``rewards``, ``quantization``,
    ``server`` and ``ocr`` extras (the ones the tests import)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {}
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + extras["rewards"] + extras["quantization"] + extras["server"] + extras["ocr"]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r} in pyproject.toml needs exactly one '>=' lower bound"
        bounds[canonicalize_name(requirement.name)] = Version(lower[0])
    return bounds


def constrained_versions() -> dict[str, Version]:
    """``name -> version`` of the ``name==version`` lines of ci/min-versions.txt."""
    versions = {}
    for line in (ROOT / "ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier
        assert spec.operator == "==", f"{line!r} in ci/min-versions.txt must pin one version with '=='"
        versions[canonicalize_name(requirement.name)] = Version(spec.version)
    return versions


def test_min_versions_are_the_declared_lower_bounds():
    declared, constrained = declared_lower_bounds(), constrained_versions()
    expected = {name: version for name, version in declared.items() if name not in NOT_CONSTRAINED}
    assert constrained == expected, (
        "ci/min-versions.txt and the lower bounds in pyproject.toml disagree; change both together "
        f"(only in pyproject: {sorted(expected.keys() - constrained.keys())}, "
        f"only in ci/min-versions.txt: {sorted(constrained.keys() - expected.keys())}, "
        f"different: {sorted(n for n in expected.keys() & constrained.keys() if expected[n] != constrained[n])})"
    )
