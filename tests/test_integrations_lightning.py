"""FisherLightningCallback: Tr(F) and FisherPenaltySGD's counters reach Lightning's CSVLogger at
the right optimizer steps (with gradient accumulation), Tr(F) equals a float64 brute force
over the probe set (examples × classes enumerated), and a planted explosion warns."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fisher_optim import FisherExplosionWarning, FisherPenaltySGD

from .conftest import tiny_mlp
from .curvature_utils import loop_exact_fisher

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger  # noqa: E402

from fisher_optim.integrations.lightning import FisherLightningCallback  # noqa: E402

EVERY, STEPS = 2, 6


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()  # float64, 5 -> 7 -> 4

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return FisherPenaltySGD(self.net, lr=0.2, momentum=0.9, alpha=0.1, every=3)


class Recorder(L.Callback):
    """After every optimizer step: a copy of the network and the optimizer's counters."""

    def __init__(self, scale_at: int | None = None) -> None:
        self.nets, self.counters, self.last, self.scale_at = {}, {}, 0, scale_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self.last:
            return
        self.last = step
        if step == self.scale_at:  # plant an explosion: sharpen the output layer
            with torch.no_grad():
                pl_module.net[2].weight.mul_(30.0)
        opt = trainer.optimizers[0]
        self.nets[step] = copy.deepcopy(pl_module.net)
        self.counters[step] = (opt.penalty_value, opt.refreshes, opt.skipped_refreshes)


def _fit(
    tmp_path: Path, callback: FisherLightningCallback, recorder: Recorder, accumulate: int = 1
) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(96, 5, generator=g, dtype=torch.float64), torch.randint(4, (96,), generator=g)
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=1,
        accumulate_grad_batches=accumulate,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # the recorder runs first: it plants the explosion before the monitor measures
    trainer.callbacks[:0] = [recorder]
    trainer.callbacks.append(callback)
    torch.manual_seed(0)
    trainer.fit(Classifier(), DataLoader(data, batch_size=8))
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


def _probe() -> torch.Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_logs_trace_and_counters_at_optimizer_steps(tmp_path: Path, accumulate: int) -> None:
    probe = _probe()
    callback = FisherLightningCallback(probe, every=EVERY, submodule="net", labels="exact")
    recorder = Recorder()
    rows = _fit(tmp_path, callback, recorder, accumulate)
    by_step = {int(r["step"]): r for r in rows}
    assert sorted(by_step) == list(range(1, STEPS + 1))  # counters at every step (n = 1)
    traced = [s for s, r in by_step.items() if r.get("fisher/trace")]
    assert traced == [EVERY, 2 * EVERY, 3 * EVERY]  # optimizer steps, not batches
    for step in traced:
        expected = loop_exact_fisher(recorder.nets[step], probe)
        assert float(by_step[step]["fisher/trace"]) == pytest.approx(expected, rel=1e-10)
        assert float(by_step[step]["fisher/exploding"]) == 0.0
        assert float(by_step[step]["fisher/duration"]) >= 0.0
    for step, row in by_step.items():
        value, refreshes, skipped = recorder.counters[step]
        assert float(row["fisher/penalty_value"]) == value
        assert float(row["fisher/refreshes"]) == refreshes == -(-step // 3)
        assert float(row["fisher/skipped_refreshes"]) == skipped == 0
    monitor = callback.monitor
    assert [r["step"] for r in monitor.history] == traced
    assert monitor.history[0]["loss"] is not None  # mean training_step loss of the step


def test_planted_explosion_warns_and_is_logged(tmp_path: Path) -> None:
    probe = _probe()
    callback = FisherLightningCallback(
        probe, every=EVERY, submodule="net", labels="exact", growth_factor=5.0
    )
    recorder = Recorder(scale_at=4)  # right before the measurement at step 4
    with pytest.warns(FisherExplosionWarning, match="step 4"):
        rows = _fit(tmp_path, callback, recorder)
    exploding = {
        int(r["step"]): float(r["fisher/exploding"]) for r in rows if r.get("fisher/trace")
    }
    assert exploding == {2: 0.0, 4: 1.0, 6: 1.0}
    trace = {int(r["step"]): float(r["fisher/trace"]) for r in rows if r.get("fisher/trace")}
    assert trace[4] > 5.0 * trace[2]
    assert trace[4] == pytest.approx(loop_exact_fisher(recorder.nets[4], probe), rel=1e-10)


def test_bad_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="every"):
        FisherLightningCallback(_probe(), every=0)
    with pytest.raises(ValueError, match="labels"):
        FisherLightningCallback(_probe(), labels="exactly")
    with pytest.raises(TypeError, match="submodule"):
        FisherLightningCallback(_probe(), submodule=3)
