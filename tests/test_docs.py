"""The documentation: every Python block of the tutorial pages runs, and the site builds.

The ```python blocks of a page run in order in one namespace (later blocks use the names of
earlier ones), from a temporary working directory. Blocks that cannot run here are written
as ```bash or ```text on purpose.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: Pages whose ```python blocks are executed.
TESTED_PAGES = (
    "index.md",
    "getting-started.md",
    "guides/language-models.md",
    "guides/fisher-noise.md",
    "guides/trainer-callbacks.md",
    "science.md",
    "break-even.md",
)

#: Seconds one page's blocks may take together (they use tiny models and data).
PAGE_BUDGET_S = 30.0

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of every fenced block whose language is ``python``/``py``."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        info = match["info"].strip().split()
        lang = info[0].lstrip(".{").lower() if info else ""
        start, body = i + 1, []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close["fence"].startswith(fence) and not close["info"].strip():
                break
            line = lines[i]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            i += 1
        i += 1
        if lang in ("python", "py"):
            blocks.append((start + 1, "\n".join(body) + "\n"))
    return blocks


def test_block_extraction() -> None:
    text = (
        "x\n```python\na = 1\n```\n```bash\nls\n```\n"
        "* item\n\n    ```py\n    b = a + 1\n    ```\n````python\n```\nc = 3\n````\n"
    )
    assert python_blocks(text) == [(3, "a = 1\n"), (11, "b = a + 1\n"), (14, "```\nc = 3\n")]


@pytest.mark.parametrize("page", TESTED_PAGES)
def test_page_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DOCS / page
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{page} has no ```python block"
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": f"docs_{Path(page).stem.replace('-', '_')}"}
    begin = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        for line, source in blocks:
            code = compile(source, f"{path}:{line}", "exec")
            try:
                exec(code, namespace)
            except Exception as exc:
                raise AssertionError(f"the block at {page}:{line} failed: {exc!r}") from exc
    elapsed = time.perf_counter() - begin
    assert elapsed < PAGE_BUDGET_S, f"{page}: its blocks took {elapsed:.1f} s"


def test_tested_pages_have_no_untested_python() -> None:
    """Code meant to run is fenced as python; the untested fences are shell or text only."""
    allowed = {"python", "py", "bash", "sh", "console", "text", "diff", "pycon", "yaml", "toml"}
    for page in TESTED_PAGES:
        for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
            match = FENCE.match(line)
            if match and match["info"].strip():
                lang = match["info"].strip().split()[0].lstrip(".{").lower()
                assert lang in allowed, f"{page}: unexpected fence language {lang!r}"


def test_api_page_documents_every_public_name() -> None:
    """docs/api.md has a ``::: fisher_optim...<name>`` entry for every exported name."""
    import fisher_optim
    import fisher_optim.curvature
    import fisher_optim.monitor

    documented = re.findall(r"^:::\s+(\S+)", (DOCS / "api.md").read_text(encoding="utf-8"), re.M)
    last = {path.rsplit(".", 1)[-1] for path in documented if path.startswith("fisher_optim.")}
    public = {
        *fisher_optim.__all__,
        *fisher_optim.curvature.__all__,
        *getattr(fisher_optim.monitor, "__all__", ["FisherMonitor"]),
    }
    missing = sorted(public - last)
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"


def test_snippet_includes_exist() -> None:
    for md in DOCS.rglob("*.md"):
        for target in re.findall(r'--8<--\s+"([^"]+)"', md.read_text(encoding="utf-8")):
            assert (ROOT / target).is_file(), f"{md.relative_to(ROOT)} includes missing {target}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    warnings_logged = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert not warnings_logged, "\n".join(warnings_logged)
    assert (tmp_path / "site" / "api" / "index.html").is_file()
