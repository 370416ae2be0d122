"""One run's folder and life cycle, shared by every benchmark training loop.

A run lives in its own folder (:class:`RunFolder`): ``config.json`` (what determines its
numbers), its logs, ``checkpoint.pt`` while it is unfinished and ``summary.json`` once it is
finished. Every file is written atomically (a temporary file, then ``os.replace``), so a run
killed at any moment leaves either the old file or the new one.

:func:`execute` is the life cycle every loop shares:

1. with ``resume``, a run whose ``summary.json`` was made with the same configuration is
   finished: its summary is returned and nothing is trained (skip-if-finished);
2. otherwise the run starts, or, with ``resume`` and a checkpoint of the same configuration,
   continues from it (a checkpoint of another configuration is a ``ValueError``);
3. the loop trains until it is done, diverges (a non-finite training loss, see
   :func:`diverged`: the run stops, since its weights cannot recover, and is finished) or
   the deadline passes (``--time-limit``): then it is checkpointed and "interrupted", and
   the same command with ``--resume`` continues it (bitwise, on CPU).

:func:`sweep` trains runs one after the other and stops at the first interrupted one, or,
with ``pack=N`` (``--pack``), in N processes at once on the same device: each run is then a
:class:`Job`, which a child process rebuilds. :data:`EXIT_INTERRUPTED` is the exit code of a
command the time limit stopped. :class:`Precision` is ``--amp``'s autocast and gradient
scaler, and :func:`train_step` the one training step every loop takes with it
(:func:`forward_loss`, then :func:`backward_step`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fisher_optim.cli import option, positive_float, positive_int

__all__ = [
    "COMPLETE",
    "DATA_ON_DEVICE",
    "DIVERGED",
    "EXIT_INTERRUPTED",
    "FINISHED",
    "INTERRUPTED",
    "MEASURED_EAGER",
    "READS_LOGS",
    "STOPPED",
    "DeviceOptions",
    "Job",
    "Precision",
    "RunFolder",
    "RunningOptions",
    "Trainable",
    "backward_step",
    "clock",
    "deadline_after",
    "device_name",
    "diverged",
    "execute",
    "forward_loss",
    "load_summary",
    "past",
    "progress_bar",
    "random_state",
    "read_jsonl",
    "set_random_state",
    "sweep",
    "train_step",
    "write_json",
    "write_jsonl",
]

COMPLETE, DIVERGED, INTERRUPTED = "complete", "diverged", "interrupted"
#: Statuses of a finished run (an interrupted one continues with ``--resume``).
FINISHED = (COMPLETE, DIVERGED)
#: Exit code of a command stopped by ``--time-limit``.
EXIT_INTERRUPTED = 3
#: What such a command prints last.
STOPPED = "stopped by --time-limit: rerun the same command with --resume to continue"
CHECKPOINT, SUMMARY, CONFIG = "checkpoint.pt", "summary.json", "config.json"
#: The ``--help`` section of :class:`RunningOptions`.
RUNNING = "running"
#: The ``--help`` section of :class:`DeviceOptions`.
DEVICE = "device"
#: ``--data-on-device``: keep the data set resident on the device if it fits (auto), always
#: (yes) or never (no: batches are moved from pinned host memory).
DATA_ON_DEVICE = ("auto", "yes", "no")


# ------------------------------------------------------------------------------ options
@dataclass
class RunningOptions:
    """The command-line options of running a script's runs, shared by every script (a
    script sets its own ``out`` default)."""

    out: str = option("runs", "output folder", group=RUNNING)
    threads: int | None = option(
        None,
        "torch CPU threads",
        unset="torch's choice",
        type=positive_int,
        metavar="N",
        group=RUNNING,
    )
    time_limit: float | None = option(
        None,
        "minutes; once exceeded, checkpoint the unfinished run and stop with exit code "
        f"{EXIT_INTERRUPTED}; the same command with --resume continues it",
        unset="no limit",
        type=positive_float,
        metavar="MINUTES",
        group=RUNNING,
    )
    resume: bool = option(
        False,
        "continue interrupted runs from their checkpoints, skip finished ones",
        action="store_true",
        group=RUNNING,
    )
    no_plot: bool = option(False, "do not draw the figure", action="store_true", group=RUNNING)
    no_progress: bool = option(
        False,
        "no progress bar (one is drawn per epoch when the "
        "output is a terminal; one line per epoch is printed either "
        "way)",
        action="store_true",
        group=RUNNING,
    )


def device_name(text: str) -> str:
    """``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:INDEX``."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:INDEX, got {text!r}")
    return text


@dataclass
class DeviceOptions:
    """Where and how a script's runs train, shared by every script that trains (none of it
    changes a run's configuration; ``--amp`` does and is a run option)."""

    device: str = option(
        "auto",
        "auto (CUDA if available, else CPU), cpu, cuda or cuda:INDEX",
        type=device_name,
        group=DEVICE,
    )
    compile: bool = option(
        False,
        "train through torch.compile(model) (the first steps "
        "compile; worth it for long runs on a GPU)",
        action="store_true",
        group=DEVICE,
    )
    data_on_device: str = option(
        "auto",
        "keep the data set resident on the device, where batches are shuffled and "
        "augmented (auto: if it takes at most half the free device memory; no: batches are "
        "made on the host and copied)",
        choices=DATA_ON_DEVICE,
        group=DEVICE,
    )
    pack: int = option(
        1,
        "train N runs at once, each in its own process on the same "
        "device (small models leave a GPU mostly idle; see the GPU guide)",
        type=positive_int,
        metavar="N",
        group=DEVICE,
    )


#: Why a script that reads the runs' logs refuses every shared option but its default.
READS_LOGS = (
    "this script reads the runs' logs (JSON) and computes no tensor: there is nothing to "
    "place on a device, compile, run in mixed precision or pack"
)
#: Why a script that only measures refuses ``--compile`` and ``--amp``.
MEASURED_EAGER = (
    "this script only measures, and measurements run on the eager model in float32 in every "
    "script; --compile and --amp apply to training steps, of which it takes none"
)


# ------------------------------------------------------------------------------ files
def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON, atomically."""
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def write_jsonl(path: str | os.PathLike, records: Sequence[dict[str, Any]]) -> None:
    """One JSON object per line, atomically."""
    _atomic(Path(path), lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a :func:`write_jsonl` file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ time
def clock() -> float:
    """The clock deadlines are compared with (``time.monotonic``; patchable in tests)."""
    return time.monotonic()


def deadline_after(minutes: float | None) -> float | None:
    """The :func:`clock` value ``minutes`` from now (None: no limit), for ``--time-limit``."""
    return None if minutes is None else clock() + 60.0 * minutes


def past(deadline: float | None) -> bool:
    """Whether ``deadline`` (a :func:`clock` value, or None: never) has passed."""
    return deadline is not None and clock() > deadline


#: Set in the processes of a packed :func:`sweep`, which draw no progress bar (one bar per
#: process on one terminal garbles it); each prints its own lines.
_PACKED_PROCESS = False


def progress_bar(total: int, initial: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar of one epoch's ``total`` steps when stderr is a terminal, ``enabled`` and
    not in a packed sweep's process (else None: the caller prints one line per epoch either
    way), the same in every script."""
    if not enabled or _PACKED_PROCESS or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def diverged(loss: float) -> bool:
    """Whether a training loss shows the run diverged (NaN or infinite)."""
    return not math.isfinite(loss)


def random_state() -> dict[str, Any]:
    """torch's global random states (CPU and CUDA), for a checkpoint."""
    import torch

    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_random_state(state: dict[str, Any]) -> None:
    """Restore :func:`random_state` (a checkpoint without CUDA states leaves them alone)."""
    import torch

    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])


# ------------------------------------------------------------------------------ a run
class RunFolder:
    """The folder of one run whose numbers are determined by ``config`` (a JSON-ready dict).

    ``key`` is the name under which the summary and the checkpoint record the configuration
    (``"spec"`` for the image experiments, ``"config"`` elsewhere). With ``stem``, several
    runs share the folder: the run's summary is ``<stem>.json`` and its checkpoint
    ``<stem>.pt`` (and the summary is where its configuration is recorded), else they are
    ``summary.json``, ``checkpoint.pt`` and ``config.json``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: dict[str, Any],
        key: str = "config",
        stem: str | None = None,
    ):
        self.path, self.config, self.key, self.stem = Path(path), config, key, stem
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / (CHECKPOINT if self.stem is None else f"{self.stem}.pt")

    @property
    def summary_path(self) -> Path:
        return self.path / (SUMMARY if self.stem is None else f"{self.stem}.json")

    def finished(self) -> dict[str, Any] | None:
        """The summary of this run if it finished with this configuration, else None."""
        done = _read_json(self.summary_path)
        return done if done is not None and done.get(self.key) == self.config else None

    def start(self) -> None:
        """Forget a previous summary and record the configuration."""
        self.summary_path.unlink(missing_ok=True)
        if self.stem is None:
            write_json(self.path / CONFIG, self.config)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def write_jsonl(self, name: str, records: Sequence[dict[str, Any]]) -> None:
        write_jsonl(self.path / name, records)

    def save(self, state: dict[str, Any]) -> None:
        """Write the checkpoint (``state`` records the configuration under ``key``)."""
        import torch

        _atomic(self.checkpoint_path, lambda tmp: torch.save({self.key: self.config, **state}, tmp))

    def load(self, map_location: Any = None) -> dict[str, Any] | None:
        """The checkpoint, or None if there is none."""
        import torch

        if not self.checkpoint_path.is_file():
            return None
        return torch.load(self.checkpoint_path, map_location=map_location, weights_only=False)


def load_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``summary.json`` of a finished run, or None."""
    return _read_json(Path(run_dir) / SUMMARY)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


class Trainable(Protocol):
    """What :func:`execute` needs of a training loop."""

    def state_dict(self) -> dict[str, Any]:
        """Everything that continues the run bitwise (model, optimizer, random states...)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""

    def resume_error(self, saved: dict[str, Any]) -> str | None:
        """Why checkpoint ``saved``, made with another configuration, cannot continue as
        this run (None: it can)."""

    def train(self, deadline: float | None, checkpoint: Callable[[], None]) -> str:
        """Train to the end: :data:`COMPLETE`, :data:`DIVERGED` or :data:`INTERRUPTED`
        (``deadline`` passed). ``checkpoint()`` saves the run (e.g. after every epoch)."""

    def position(self) -> dict[str, int]:
        """Where the run is (``{"epoch": 3, "step": 0}``), for the log and the result of an
        interrupted run."""

    def summary(self, status: str) -> dict[str, Any]:
        """The summary of the finished run (``status`` is complete or diverged)."""


def execute(
    folder: RunFolder,
    start: Callable[[], Trainable],
    *,
    resume: bool = False,
    deadline: float | None = None,
    keep_checkpoint: bool = True,
    map_location: Any = None,
    name: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Train the run of ``folder`` (built by ``start()``) to its end: see the module doc.

    Returns its summary (also in ``summary.json``), or ``{"status": "interrupted", key:
    config, "name": name, **run.position()}`` when ``deadline`` stopped it (its checkpoint
    is saved). With ``keep_checkpoint=False`` a finished run's checkpoint is removed.
    """
    name = name or folder.path.name
    say = log or (lambda _: None)
    if resume:
        done = folder.finished()
        if done is not None:
            return done
    folder.start()
    run = start()
    saved = folder.load(map_location) if resume else None
    if saved is not None:
        if saved[folder.key] != folder.config:
            why = run.resume_error(saved)
            if why is not None:
                raise ValueError(
                    f"{folder.checkpoint_path} belongs to a different run "
                    f"configuration ({why}); remove it or drop --resume"
                )
        run.load_state_dict(saved)
        say(f"[{name}] resumed at {_where(run)}")

    def checkpoint() -> None:
        folder.save(run.state_dict())

    status = run.train(deadline, checkpoint)
    if status == INTERRUPTED:
        checkpoint()
        say(f"[{name}] time limit: checkpointed at {_where(run)}; rerun with --resume to continue")
        return {"name": name, folder.key: folder.config, "status": INTERRUPTED, **run.position()}
    summary = run.summary(status)
    write_json(folder.summary_path, summary)
    if not keep_checkpoint:
        folder.checkpoint_path.unlink(missing_ok=True)
    return summary


def _where(run: Trainable) -> str:
    return " ".join(f"{k} {v}" for k, v in run.position().items())


class Job:
    """One run of a :func:`sweep`: ``job(deadline)`` is ``fn(*args, deadline=deadline,
    **kwargs)``, which returns an :func:`execute` result.

    A job pickles, so that a child process of a packed sweep can rebuild it: ``fn`` must be
    a module-level function (found again by its module's name, or, for a script loaded from
    its file, by that file, before its arguments are rebuilt) and ``args``, ``kwargs``
    must pickle (tensors, data sets, dicts; not a lambda).
    """

    def __init__(self, fn: Callable[..., dict[str, Any]], /, *args: Any, **kwargs: Any):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self, deadline: float | None) -> dict[str, Any]:
        return self.fn(*self.args, deadline=deadline, **self.kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        module = sys.modules.get(self.fn.__module__)
        where = (self.fn.__module__, getattr(module, "__file__", None), self.fn.__qualname__)
        # the function first: its module is loaded before the arguments, whose classes
        # may live there
        return (_job, (_Function(*where), self.args, self.kwargs))


class _Function:
    """A module-level function, pickled by its module's name and file (see :class:`Job`)."""

    def __init__(self, module: str, file: str | None, qualname: str):
        self.where = (module, file, qualname)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_find_function, self.where)


def _find_function(module: str, file: str | None, qualname: str) -> Any:
    """The function ``qualname`` of ``module`` (imported, or loaded from ``file``)."""
    found = sys.modules.get(module)
    if found is None:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if file is None or e.name != module:
                raise
            spec = importlib.util.spec_from_file_location(module, file)
            found = importlib.util.module_from_spec(spec)
            sys.modules[module] = found
            spec.loader.exec_module(found)
    for part in qualname.split("."):
        found = getattr(found, part)
    return found


def _job(fn: Callable[..., dict[str, Any]], args: tuple, kwargs: dict[str, Any]) -> Job:
    return Job(fn, *args, **kwargs)


def sweep(
    runs: Sequence[Callable[[float | None], dict[str, Any]]],
    *,
    deadline: float | None = None,
    pack: int = 1,
    folder: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Train ``runs``: call each (``run(deadline)``, an :func:`execute` result) in order,
    stopping at the first interrupted one. Returns the results and whether every run
    finished.

    With ``pack > 1`` (and more than one run), ``pack`` processes train at once on the same
    device, process ``r`` the runs ``runs[r::pack]`` in order (each stops at its first
    interrupted run) with ``1/pack`` of torch's CPU threads; every run is then a
    :class:`Job`. The jobs reach the processes through a file in ``folder`` (default: the
    system's temporary folder), not shared memory (a container's ``/dev/shm`` is often
    small). The results are those of ``runs``, in order, up to the first run no process
    reached; a run that finished after that one is on disk, and ``--resume`` finds it.
    """
    if pack > 1 and len(runs) > 1:
        return _sweep_packed(list(runs), deadline, min(pack, len(runs)), folder)
    out = []
    for run in runs:
        out.append(run(deadline))
        if out[-1].get("status") == INTERRUPTED:
            return out, False
    return out, True


def _sweep_packed(
    runs: list[Callable[[float | None], dict[str, Any]]],
    deadline: float | None,
    pack: int,
    folder: str | os.PathLike | None,
) -> tuple[list[dict[str, Any]], bool]:
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    import torch

    bad = [type(r).__name__ for r in runs if not isinstance(r, Job)]
    if bad:
        raise TypeError(f"a packed sweep trains Jobs (a child process rebuilds them), got {bad}")
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    # a child's clock is its own: the deadline travels as a wall time
    wall = None if deadline is None else time.time() + (deadline - clock())
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix=".pack-", dir=folder) as tmp:
        jobs = Path(tmp) / "jobs.pt"
        torch.save(runs, jobs)  # once: data shared by several runs is written once
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(pack, mp_context=context) as pool:
            shares = [
                pool.submit(_train_share, str(jobs), rank, pack, wall, threads)
                for rank in range(pack)
            ]
            done = [share.result() for share in shares]
    results: list[dict[str, Any]] = []
    for i in range(len(runs)):
        share = done[i % pack]
        if i // pack >= len(share):
            break
        results.append(share[i // pack])
    complete = len(results) == len(runs) and all(r.get("status") != INTERRUPTED for r in results)
    return results, complete


def _train_share(
    jobs: str, rank: int, pack: int, wall: float | None, threads: int
) -> list[dict[str, Any]]:
    """Process ``rank`` of a packed :func:`sweep`: its share of the runs, in order."""
    import torch

    global _PACKED_PROCESS
    _PACKED_PROCESS = True
    torch.set_num_threads(max(1, threads // pack))
    deadline = None if wall is None else clock() + (wall - time.time())
    out = []
    for run in torch.load(jobs, weights_only=False)[rank::pack]:
        out.append(run(deadline))
        if out[-1].get("status") == INTERRUPTED:
            break
    return out


# ------------------------------------------------------------------------------ precision
class Precision:
    """``--amp`` for a training step: the forward under ``torch.autocast`` in bfloat16
    (``"bf16"``) or float16 with a ``GradScaler`` (``"fp16"``, whose inf check reads one
    value per step), or float32 (None). Measurements run outside :meth:`autocast`, in
    float32.

    >>> import torch
    >>> p = Precision(None, torch.device("cpu"))
    >>> p.scaler is None and p.state_dict() == {}
    True
    """

    DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

    def __init__(self, amp: str | None, device: Any):
        import torch

        if amp is not None and amp not in self.DTYPES:
            raise ValueError(f"amp must be None or one of {tuple(self.DTYPES)}, got {amp!r}")
        self.amp, self.device = amp, torch.device(device)
        self.dtype = None if amp is None else getattr(torch, self.DTYPES[amp])
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of the training forward (and its loss)."""
        import torch

        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: Any) -> None:
        """``loss.backward()``, scaled with fp16."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, opt: Any) -> None:
        """``opt.step()``, through the scaler with fp16 (skipped on an inf or NaN gradient)."""
        if self.scaler is None:
            opt.step()
        else:
            self.scaler.step(opt)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """For a checkpoint: ``{"scaler": ...}`` with fp16, else empty."""
        return {} if self.scaler is None else {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


# ------------------------------------------------------------------------- training step
def forward_loss(
    forward: Callable[[Any], Any],
    precision: Precision,
    x: Any,
    y: Any,
    loss_fn: Callable[[Any, Any], Any] | None = None,
) -> tuple[Any, Any]:
    """The training forward and its loss under ``precision``'s autocast: ``out = forward(x)``
    and ``loss_fn(out, y)`` (default: :func:`torch.nn.functional.cross_entropy`)."""
    if loss_fn is None:
        import torch.nn.functional as F

        loss_fn = F.cross_entropy
    with precision.autocast():
        out = forward(x)
        return out, loss_fn(out, y)


def backward_step(
    opt: Any, precision: Precision, loss: Any, before_step: Callable[[], None] | None = None
) -> None:
    """The update of a training step: ``opt.zero_grad(set_to_none=True)``, the backward of
    ``loss`` (scaled with fp16), ``before_step()`` (e.g. an optimizer's ``set_targets``),
    then ``opt.step()`` (through the scaler with fp16)."""
    opt.zero_grad(set_to_none=True)
    precision.backward(loss)
    if before_step is not None:
        before_step()
    precision.step(opt)


def train_step(
    forward: Callable[[Any], Any],
    opt: Any,
    precision: Precision,
    x: Any,
    y: Any,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    before_step: Callable[[], None] | None = None,
) -> tuple[Any, Any]:
    """One training step on the batch ``(x, y)``: :func:`forward_loss`, then
    :func:`backward_step`. Returns ``(out, loss)`` (not detached); reads nothing back from
    the device.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    >>> before = model.weight.detach().clone()
    >>> out, loss = train_step(model, opt, Precision(None, "cpu"), x, y)
    >>> out.shape, bool((model.weight != before).any())
    (torch.Size([4, 2]), True)
    """
    out, loss = forward_loss(forward, precision, x, y, loss_fn)
    backward_step(opt, precision, loss, before_step)
    return out, loss
