"""fisher_optim.integrations.timm: the names in timm's optimizer factory.

timm needs torchvision, which this project's environment cannot hold beside its torch, so
the factory is tested three ways, whichever can run:

* against real timm, when it imports;
* against real timm's ``timm.optim`` package loaded without ``timm/__init__`` (which is what
  imports torchvision), when timm is installed without its dependencies
  (``pip install --no-deps timm`` in a throwaway venv);
* always, against a stand-in that does what timm 1.0's ``OptimizerRegistry.create_optimizer``
  does with a registered class: weight-decay groups without biases and 1-d parameters,
  the name's part after the last ``_``, momentum 0.9 by default where ``has_momentum``,
  ``eps``/``betas`` dropped unless flagged, then ``cls(param_groups, **kwargs)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisher_optim import FisherPenaltySGD
from fisher_optim.integrations.timm import TIMM_NAMES, register_timm_optimizers


@dataclass(frozen=True)
class _OptimInfo:  # timm.optim.OptimInfo's fields
    name: str
    opt_class: Any
    description: str = ""
    has_eps: bool = True
    has_momentum: bool = False
    has_betas: bool = False
    num_betas: int = 2
    second_order: bool = False
    defaults: dict | None = None


class _Registry:
    """The part of timm 1.0's ``OptimizerRegistry`` a registered optimizer meets."""

    def __init__(self) -> None:
        self.infos: dict[str, _OptimInfo] = {}

    def register(self, info: _OptimInfo) -> None:
        self.infos[info.name.lower()] = info

    def create_optimizer(
        self,
        model_or_params: nn.Module,
        opt: str,
        lr: float | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        **kwargs: Any,
    ):
        decay = [p for p in model_or_params.parameters() if p.ndim > 1]
        no_decay = [p for p in model_or_params.parameters() if p.ndim <= 1]
        params = [
            {"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay},
        ]
        info = self.infos[opt.lower().split("_")[-1]]
        args = {"weight_decay": 0.0, **kwargs}
        if lr is not None:
            args["lr"] = lr
        if info.has_momentum:
            args.setdefault("momentum", momentum)
        if not info.has_eps:
            args.pop("eps", None)
        if not info.has_betas:
            args.pop("betas", None)
        return info.opt_class(params, **args)


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> _Registry:
    """A fake ``timm.optim`` (with ``OptimInfo``) and its default registry."""
    registry = _Registry()
    timm = types.ModuleType("timm")
    optim = types.ModuleType("timm.optim")
    factory = types.ModuleType("timm.optim._optim_factory")
    optim.OptimInfo = _OptimInfo
    factory.default_registry = registry
    timm.optim = optim
    optim._optim_factory = factory
    for name, module in (
        ("timm", timm),
        ("timm.optim", optim),
        ("timm.optim._optim_factory", factory),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return registry


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 4, generator=g), torch.randint(3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _check_factory(create: Any) -> None:
    """``create(model, name, **kw)`` builds FisherPenaltySGD that trains as one built by hand
    on the same parameter groups."""
    model = _model()
    opt = create(
        model, "fishersgd", lr=0.1, weight_decay=1e-3, alpha=0.01, every=2, model=model, seed=0
    )
    assert isinstance(opt, FisherPenaltySGD)
    assert type(opt.base_optimizer) is torch.optim.SGD
    groups = [(g["weight_decay"], g["momentum"], g["penalty_weight"]) for g in opt.param_groups]
    assert sorted(groups) == [(0.0, 0.9, 0.01), (1e-3, 0.9, 0.01)]

    reference = _model()
    params = [
        {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        {"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 1e-3},
    ]
    by_hand = FisherPenaltySGD(
        reference, params=params, lr=0.1, momentum=0.9, alpha=0.01, every=2, seed=0
    )
    _train(model, opt)
    _train(reference, by_hand)
    assert opt.refreshes == by_hand.refreshes == 2
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)

    adamw = create(
        model, "fisheradamw", lr=1e-3, alpha=0.01, model=model, betas=(0.8, 0.9), eps=1e-7
    )
    assert type(adamw.base_optimizer) is torch.optim.AdamW
    assert adamw.param_groups[0]["betas"] == (0.8, 0.9) and adamw.param_groups[0]["eps"] == 1e-7

    with pytest.raises(ValueError, match="model=model"):
        create(model, "fishersgd", lr=0.1, alpha=0.01)
    with pytest.raises(ValueError, match="alpha="):
        create(model, "fishersgd", lr=0.1, model=model)


def test_stand_in_factory(stand_in: _Registry) -> None:
    assert register_timm_optimizers() == list(TIMM_NAMES) == ["fishersgd", "fisheradamw"]
    assert set(stand_in.infos) == set(TIMM_NAMES)
    assert all("_" not in name for name in TIMM_NAMES)  # timm keeps the part after the last _
    _check_factory(stand_in.create_optimizer)


def test_explicit_registry(stand_in: _Registry) -> None:
    other = _Registry()
    register_timm_optimizers(other)
    assert set(other.infos) == set(TIMM_NAMES) and not stand_in.infos


def _real_timm_optim() -> Any:
    """Real ``timm.optim``: imported, or loaded without ``timm/__init__``; else skip."""
    try:
        return importlib.import_module("timm.optim")
    except ModuleNotFoundError as err:
        if err.name != "torchvision":
            pytest.skip("timm is not installed")
    spec = importlib.util.find_spec("timm")
    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        del sys.modules[name]
    package = types.ModuleType("timm")
    package.__path__ = [str(Path(spec.origin).parent)]
    models = types.ModuleType("timm.models")  # only its layer-decay helper is imported
    models.group_parameters = None
    sys.modules.update({"timm": package, "timm.models": models})
    return importlib.import_module("timm.optim")


def test_real_timm_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = {m: mod for m, mod in sys.modules.items() if m == "timm" or m.startswith("timm.")}
    try:
        optim = _real_timm_optim()
        register_timm_optimizers()
        assert set(TIMM_NAMES) <= set(optim.list_optimizers("fisher*"))
        _check_factory(optim.create_optimizer_v2)
    finally:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_without_timm_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        register_timm_optimizers()


# README.md's timm route: torchvision from the index torch came from, at the version built for
# the pinned torch. (scripts/release_check.sh --timm runs the route itself in a fresh venv.)
ROOT = Path(__file__).resolve().parent.parent


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_constraints_pin_the_torchvision_built_for_the_pinned_torch() -> None:
    from packaging.specifiers import SpecifierSet

    pins = _pins()
    major, minor, patch = map(int, pins["torch"].split("."))
    # torchvision 0.(m + 15).p is built for torch 2.m.p (0.15 for 2.0, ..., 0.28 for 2.13)
    assert major == 2 and pins["torchvision"] == f"0.{minor + 15}.{patch}", pins
    # the CPU build installed first satisfies the pin, so `pip install -c constraints.txt
    # timm` keeps it
    assert SpecifierSet(f"=={pins['torchvision']}").contains(f"{pins['torchvision']}+cpu")
    route = (
        f"pip install torch=={pins['torch']} torchvision=={pins['torchvision']} "
        "--index-url https://download.pytorch.org/whl/cpu\npip install -c constraints.txt timm\n"
    )
    for page in ("README.md", "docs/guides/integration.md"):
        if (ROOT / page).is_file():
            assert route in (ROOT / page).read_text(encoding="utf-8"), page


def test_transformers_trainer_imports_beside_the_installed_torchvision() -> None:
    """``from transformers import Trainer`` in a fresh interpreter, with whatever torchvision
    this environment has (none, or the route's build): a torchvision built for another torch
    fails it."""
    pytest.importorskip("transformers")
    code = (
        "import importlib.util\n"
        "from transformers import Trainer\n"
        "if importlib.util.find_spec('torchvision'):\n"
        "    import torch, torchvision.ops\n"
        "    torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
