"""The documentation site reads offline: MathJax is vendored (no CDN) and loaded from a local
path by every page (the browser check is scripts/docs_screenshots.sh)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MATHJAX = ROOT / "docs" / "javascripts" / "mathjax"


def test_mathjax_is_vendored_and_no_script_comes_from_the_network() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    scripts = re.search(r"^extra_javascript:\n((?:  - .*\n)+)", config, re.M)
    assert scripts is not None
    assert "http" not in scripts[1], "a script loads from the network"
    assert "javascripts/mathjax/startup.js" in scripts[1]
    loaded = re.search(r"load: \[([^]]*)\]", (ROOT / "docs/javascripts/mathjax.js").read_text())
    assert loaded is not None
    for component in re.findall(r'"([^"]+)"', loaded[1]):
        assert (MATHJAX / f"{component}.js").is_file(), component
    assert (MATHJAX / "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").is_file()
    big = [p.name for p in MATHJAX.rglob("*") if p.is_file() and p.stat().st_size >= 1 << 20]
    assert not big, f"files of 1 MiB or more: {big}"


def test_built_science_page_loads_mathjax_locally(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    page = (site / "science" / "index.html").read_text()
    sources = re.findall(r'<script src="([^"]+)"', page)
    assert "../javascripts/mathjax/startup.js" in sources
    assert not [s for s in sources if s.startswith(("http:", "https:", "//"))], sources
    assert (site / "javascripts/mathjax/startup.js").is_file()
    assert page.count('class="arithmatex"') > 50  # the formulas MathJax typesets
