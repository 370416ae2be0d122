"""A data set the user does not have: every benchmark script that takes one ends in one
paragraph (the paths searched, ``--data-root``, ``--download`` and the URL; exit code 2, no
traceback), and so does ``--download`` offline. The network is monkeypatched: nothing
downloads here. Also: every option is declared once, as a dataclass field."""

from __future__ import annotations

import importlib
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from .test_bench_cli import EXPERIMENTS, _script  # noqa: E402

cli = importlib.import_module("benchmarks.common.cli")
data = importlib.import_module("benchmarks.common.data")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: a download attempt fails as it does offline."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", refuse)


def _assert_paragraph(err: str, root: Path, url: str) -> None:
    text = " ".join(err.split())
    assert "Traceback" not in err and "\n\n" not in err.strip()
    assert str(root) in text and "looked for" in text
    assert "--data-root" in text and "--download" in text and url in text


def _url(dataset: str) -> str:
    return data.CIFAR_SOURCES.get(dataset, data.TINYIMAGENET_SOURCE)[0]


@pytest.mark.parametrize("download", [False, True], ids=["no-flag", "download-offline"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_without_its_data_ends_in_one_paragraph(name, download, tmp_path, capsys):
    cfg = _script(name).CONFIG
    empty = tmp_path / "empty"
    argv = [
        "--data-root",
        str(empty),
        "--out",
        str(tmp_path / "out"),
        "--no-plot",
        "--device",
        "cpu",
        *(["--download"] if download else []),
    ]
    assert cli.main(cfg, argv) == 2
    err = capsys.readouterr().err
    _assert_paragraph(err, empty, _url(cfg.dataset))
    assert ("The download failed" in " ".join(err.split())) == download
    assert not list(empty.glob("*.part"))


@pytest.mark.parametrize("download", [False, True], ids=["no-flag", "download-offline"])
def test_break_even_without_its_data_ends_in_one_paragraph(download, tmp_path, capsys):
    break_even = _script("break_even")
    empty = tmp_path / "empty"
    argv = [
        "--data-root",
        str(empty),
        "--out",
        str(tmp_path / "out"),
        *(["--download"] if download else []),
    ]
    assert break_even.main(argv) == 2
    _assert_paragraph(capsys.readouterr().err, empty, _url("cifar10"))


def test_the_campaign_without_its_data_records_the_paragraph(tmp_path, capsys):
    campaign = importlib.import_module("benchmarks.gpu_campaign")
    empty = tmp_path / "empty"
    result = campaign.main(
        [
            "--parts",
            "table1",
            "--data-root",
            str(empty),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--pack",
            "1",
        ]
    )
    _assert_paragraph(capsys.readouterr().err, empty, _url("cifar10"))
    assert "--download" in result["parts"]["table1"]["error"]


def test_download_verifies_the_checksum_and_shows_progress(tmp_path, monkeypatch, capsys):
    """A download whose MD5 does not match is removed and reported in the same paragraph."""
    import io

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(b"not it"))
    with pytest.raises(data.MissingData, match="MD5 mismatch") as err:
        data.download_dataset("tinyimagenet", tmp_path)
    assert data.TINYIMAGENET_URL in str(err.value) and "--download" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_every_option_is_declared_once_as_a_dataclass_field():
    """``add_argument`` appears only in fisher_optim/cli.py (the benchmarks' and the demo's
    options are dataclass fields)."""
    files = [
        p
        for folder in ("benchmarks", "fisher_optim")
        for p in (ROOT / folder).rglob("*.py")
        if p != ROOT / "fisher_optim" / "cli.py"
    ]
    assert len(files) > 40
    offenders = [str(p.relative_to(ROOT)) for p in files if "add_argument" in p.read_text()]
    assert offenders == []
