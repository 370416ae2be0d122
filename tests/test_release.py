"""The release: one version, the declared torch floor is the checked and tested one, and what
the sdist and wheel must carry (scripts/release_check.sh builds and installs them for real)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import fisher_optim
from fisher_optim._requires import MIN_TORCH, require_torch, torch_version

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ".".join(map(str, MIN_TORCH))


def test_one_version_everywhere() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "fisher_optim.__version__" }' in pyproject
    newest = re.search(r"^## \[([^]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest is not None and newest[1] == fisher_optim.__version__


def test_declared_torch_floor_is_the_checked_one() -> None:
    assert f'"torch>={FLOOR}"' in (ROOT / "pyproject.toml").read_text()
    assert f"`torch>={FLOOR}`" in (ROOT / "README.md").read_text()
    assert torch_version("2.13.0+cpu") == (2, 13)
    with pytest.raises(ImportError, match=rf"needs torch>={FLOOR}, found torch 2\.5\.1"):
        require_torch(MIN_TORCH, "fisher_optim", found="2.5.1")
    with pytest.raises(ValueError, match="version="):
        torch_version("nightly")


def test_sdist_and_wheel_carry_changelog_and_py_typed() -> None:
    assert (ROOT / "fisher_optim" / "py.typed").is_file()
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert "CHANGELOG.md" in manifest and "fisher_optim" in manifest
    assert 'fisher_optim = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()


def test_workflow_tests_the_floors_and_publishes_by_trusted_publishing() -> None:
    workflow = ROOT / ".github" / "workflows" / "release.yml"
    if not workflow.is_file():  # an unpacked sdist carries no .github
        pytest.skip("no .github/workflows/release.yml in this tree")
    text = workflow.read_text()
    requires_python = re.search(
        r'requires-python = ">=([\d.]+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert requires_python is not None
    assert f'python: "{requires_python[1]}"\n            torch: "{FLOOR}.0"' in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert "id-token: write" in text and "pypa/gh-action-pypi-publish@release/v1" in text
    assert "--tag" in text and "scripts/release_check.sh" in text
    assert 'timm: "--timm"' in text and "${{ matrix.timm }}" in text  # README's timm route


def _release_check(tmp_path: Path, heading: str, tag: str) -> subprocess.CompletedProcess:
    """scripts/release_check.sh on a copy of the tree's version and changelog: the tag checks
    run before anything is built."""
    (tmp_path / "scripts").mkdir(parents=True)
    (tmp_path / "fisher_optim").mkdir()
    shutil.copy(ROOT / "scripts" / "release_check.sh", tmp_path / "scripts")
    (tmp_path / "fisher_optim" / "__init__.py").write_text('__version__ = "1.2.3"\n')
    (tmp_path / "CHANGELOG.md").write_text(f"# Changelog\n\n{heading}\n\n- a change\n")
    return subprocess.run(
        ["bash", str(tmp_path / "scripts" / "release_check.sh"), "--build-only", "--tag", tag],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_tag_must_equal_the_version_and_its_entry_carry_a_date(tmp_path: Path) -> None:
    wrong = _release_check(tmp_path / "wrong", "## [1.2.3] - 2026-01-02", "v1.2.4")
    assert wrong.returncode == 1 and "the tag 'v1.2.4' is not 'v1.2.3'" in wrong.stderr
    undated = _release_check(tmp_path / "undated", "## [1.2.3] - Unreleased", "v1.2.3")
    assert undated.returncode == 1 and "has no release date" in undated.stderr
    other = _release_check(tmp_path / "other", "## [1.2.2] - 2026-01-02", "v1.2.3")
    assert other.returncode == 1 and "newest entry is 1.2.2, not 1.2.3" in other.stderr
