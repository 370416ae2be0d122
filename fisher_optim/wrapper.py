"""The stateful shell shared by FisherPenaltySGD and FisherNoiseSGD: a drop-in optimizer.

A :class:`GradientWrapper` is a ``torch.optim.Optimizer`` that wraps a base optimizer and
changes ``p.grad`` just before the base optimizer's step. It shares ``param_groups`` and
``state`` with the base optimizer (as SAM does), so LR schedulers, ``zero_grad``,
``GradScaler`` and checkpointing work as with the base optimizer alone. It learns the current
batch without changing the training loop: a forward pre-hook on the model keeps a reference
to the latest training-mode input (and the autocast state it ran under), nothing more, and
drops it after the step.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fisher_optim._as_found import left_as_found
from fisher_optim._data_parallel import broadcast_seed, mean_over_ranks
from fisher_optim._fsdp import is_sharded, local_shard, mesh_group
from fisher_optim._logits import OutputFn, check_batched, model_output
from fisher_optim._modules import eval_mode, unwrap
from fisher_optim.batch import Batch, holds_examples
from fisher_optim.curvature.examples import check_examples_alone, probe_indices
from fisher_optim.validate import check_keywords

#: Key under which a wrapper's own state is stored in ``state_dict()``.
STATE_KEY = "fisher_optim"


class GradientWrapper(torch.optim.Optimizer):
    """Base class: wraps ``base_optimizer`` and edits gradients before its ``step``.

    Subclasses implement :meth:`_before_base_step` (called once per step, after the closure
    if any, with gradients in place and unscaled) and extend :meth:`_extra_state` /
    :meth:`_load_extra_state`.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        seed: int | None = None,
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
                "itself (not model.parameters()): the optimizer needs it to rerun the forward"
            )
        base = _build_base(model, base_optimizer, base_kwargs, type(self))
        _check_params_in_model(model, base)
        _check_trainable(base, type(self).__name__)
        _check_no_key_collision(type(self).__name__, base, defaults)
        self._own_defaults = dict(defaults)
        super().__init__(base.param_groups, defaults)
        self.base_optimizer = base
        self.defaults = {**base.defaults, **defaults}
        self._link()

        self.model = model
        self.module = unwrap(model)
        self.step_count = 0
        self.seed = torch.initial_seed() % (2**62) + 1 if seed is None else int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._batch: Batch | None = None
        self._autocast: tuple[str, torch.dtype] | None = None
        self._targets: Tensor | None = None
        self._in_own_pass = False
        self._warned_not_ddp = False
        #: the process group of the DDP wrapper seen calling the model (built before the wrap)
        self._ddp_group: Any | None = None
        self._seed_synced = False
        self._checked_layouts: set[tuple[Any, ...]] = set()
        self.max_grad_norm = check_max_grad_norm(max_grad_norm)
        #: ``||∇||`` of the full gradient before clipping (a 0-dim tensor), when clipping.
        self.grad_norm: Tensor | None = None
        self._born = next(_CLOCK)
        self._hook = model.register_forward_pre_hook(_CaptureHook(self), with_kwargs=True)

    # ----------------------------------------------------------------- sharing the base
    def _link(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # called by Optimizer.__init__ on the base's own groups
            super().add_param_group(param_group)
            return
        base.add_param_group(param_group)
        for key, value in self._own_defaults.items():
            base.param_groups[-1].setdefault(key, value)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict; the wrapper's own state (counters, caches,
        generators) under the key ``"fisher_optim"`` of its first param group, which
        ``torch.distributed.checkpoint.state_dict``'s get/set_optimizer_state_dict carry
        (they keep only ``state`` and ``param_groups``)."""
        state = self.base_optimizer.state_dict()
        state["param_groups"][0][STATE_KEY] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop(STATE_KEY, None)  # where checkpoints of 0.1.0 kept it
        groups = [dict(g) for g in state_dict["param_groups"]]
        for group in groups:
            extra = group.pop(STATE_KEY, extra)
        state_dict["param_groups"] = groups
        self.base_optimizer.load_state_dict(state_dict)
        self._link()  # load_state_dict replaces the base's param_groups and state
        if extra is not None:
            self._load_extra_state(extra)

    # ----------------------------------------------------------------- the batch
    def _capture(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._in_own_pass or not module.training or not torch.is_grad_enabled():
            return
        ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
        if ddp is not None and ddp.module is module:  # the optimizer was built before the wrap
            self._ddp_group = ddp.process_group
        self._batch = Batch(args, dict(kwargs))
        device = self._batch_device()
        if torch.is_autocast_enabled(device.type):
            self._autocast = (device.type, torch.get_autocast_dtype(device.type))
        else:
            self._autocast = None

    def set_targets(self, targets: Tensor) -> None:
        """Give the targets of the current batch (needed by penalties that use true labels).

        Call it once per iteration, before ``step()``; it is forgotten after the step.
        """
        if not isinstance(targets, Tensor):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        self._targets = targets

    def current_batch(self) -> Batch:
        """The latest training-mode batch (with the targets given to :meth:`set_targets`)."""
        if self._batch is None:
            raise RuntimeError(_no_forward(type(self).__name__, self.model))
        return Batch(self._batch.args, self._batch.kwargs, self._targets)

    def cut(
        self, batch: Batch, n: int | None, output_fn: OutputFn | None, per_example: bool = False
    ) -> Batch:
        """The first ``n`` examples of ``batch`` (:meth:`Batch.head`, by the one rule of
        :mod:`fisher_optim.batch`), checked: the model on the first and the last example alone must
        reproduce their outputs in ``batch`` (else ``ValueError`` naming the fix),
        so that a shared tensor whose first dimension happens to be the batch size is never
        cut silently. Checked when the cut is ambiguous (``n`` cuts the batch and a tensor
        input besides the first has the batch size as first dimension) or, with
        ``per_example`` (the examples are then run one by one), always; once per input
        layout: two forwards without gradients (the whole batch and one example) in a
        :meth:`measuring_pass` (or the caller's, when called inside one); none for a model
        called with one tensor, or when nothing is cut."""
        head = batch.head(n)
        if per_example or (head is not batch and _ambiguous(batch)):
            self._check_examples_alone(batch, output_fn)
        return head

    def _check_examples_alone(self, batch: Batch, output_fn: OutputFn | None) -> None:
        layout = input_layout(batch)
        if layout in self._checked_layouts:
            return
        module = getattr(self.module, "_orig_mod", self.module)  # torch.compile: eager module
        inside = self._in_own_pass  # FisherNoiseSGD's per-example pass: a measuring pass
        with contextlib.nullcontext() if inside else self.measuring_pass(), torch.no_grad():
            check_alone(module, batch, output_fn, type(self).__name__)
        self._checked_layouts.add(layout)

    @contextlib.contextmanager
    def measuring_pass(self) -> Iterator[None]:
        """The wrapper's own pass (:meth:`own_pass`, full precision) in eval mode, the model
        left as found: the buffers a forward changes (a call counter), flags, renormalised
        embedding rows (``check=False``: a training forward that changes a parameter in
        place may do so; ``read_back=False``: no host sync)."""
        module = getattr(self.module, "_orig_mod", self.module)
        with (
            eval_mode(module),
            left_as_found(module, check=False, read_back=False),
            self.own_pass(False),
        ):
            yield

    def _batch_device(self) -> torch.device:
        try:
            return self._batch.first_tensor().device if self._batch else torch.device("cpu")
        except ValueError:
            return next(self.module.parameters()).device

    def own_pass(self, autocast: bool = True) -> _OwnPass:
        """Context for the wrapper's own forwards: not captured; under training's autocast
        (if it had one) when ``autocast`` is true, in full precision otherwise.

        Its random draws (dropout masks) come from a private stream seeded by ``seed`` and
        the step count, and torch's global random state is restored on exit, so a run with
        the wrapper draws exactly the data order and dropout masks of a run without it.
        """
        return _OwnPass(self, autocast)

    def generator(self, device: torch.device) -> torch.Generator:
        """This optimizer's random generator on ``device`` (seeded with ``self.seed``)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[key]

    # ----------------------------------------------------------------- step
    def _before_base_step(self) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Edit the gradients (see the subclass), then take the base optimizer's step.

        ``closure``, as in torch: re-evaluates the model and returns the loss. It is passed
        on to the base optimizer (which may call it several times, as LBFGS does); the
        gradients are edited after its first call.
        """
        if _initialises_state(self):
            return self.base_optimizer.step(closure)
        _check_one_wrapper(self)
        done = False

        def prepare() -> None:
            nonlocal done
            if not done:
                with torch.enable_grad():
                    self._before_base_step()
                if self.max_grad_norm is not None:
                    norm = clip_full_gradient(self.flat_params(), self.max_grad_norm)
                    self.grad_norm = self.grad_norm if norm is None else norm
                done = True

        if closure is None:
            prepare()
            loss = self.base_optimizer.step()
        else:

            def wrapped() -> Any:
                with torch.enable_grad():
                    value = closure()
                prepare()
                return value

            loss = self.base_optimizer.step(wrapped)
        self.step_count += 1
        self._batch = None
        self._targets = None
        return loss

    # ----------------------------------------------------------------- distributed
    def _process_group(self) -> Any | None:
        """The data-parallel process group to average over, or None outside DDP: the group
        of the DDP-wrapped model; of the DDP wrapper seen calling the model, when the
        optimizer was built on the model before it was wrapped (as nanoGPT does); else, in a
        process group of more than one rank, the whole group (with a warning, once)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.process_group
        if self._ddp_group is not None:
            return self._ddp_group
        if dist.get_world_size() == 1:
            return None
        if not self._warned_not_ddp:
            self._warned_not_ddp = True
            warnings.warn(_not_ddp(type(self).__name__), RuntimeWarning, stacklevel=3)
        return dist.group.WORLD

    def data_parallel_group(self) -> Any | None:
        """The ranks that hold the other slices of the global batch: under FSDP2 those of
        the parameters' device mesh (every rank for HSDP), else the DDP group
        (:meth:`_process_group`), or None on one process."""
        params = self.flat_params()
        if is_sharded(params):
            return mesh_group(params, type(self).__name__)
        return self._process_group()

    def all_reduce_mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """Average ``tensors`` over the data-parallel ranks with one all-reduce (no-op on one
        process)."""
        group = self.data_parallel_group()
        return tensors if group is None else mean_over_ranks(tensors, group)

    def sync_seed(self, group: Any) -> None:
        """Broadcast the seed from the group's first rank (once), so that every rank draws
        the same random numbers (labels, noise) as one process would."""
        if self._seed_synced or group is None or dist.get_world_size(group) == 1:
            return
        seed = broadcast_seed(self.seed, group, next(iter(self.flat_params())).device)
        if seed != self.seed:
            self.seed, self._generators = seed, {}
        self._seed_synced = True

    # ----------------------------------------------------------------- state
    def flat_params(self) -> list[Tensor]:
        """All parameters, in the order ``state_dict()`` numbers them."""
        return [p for group in self.param_groups for p in group["params"]]

    def group_slices(self, flat: list[Any]) -> list[list[Any]]:
        """Cut a list aligned with :meth:`flat_params` into one list per param group."""
        out, offset = [], 0
        for group in self.param_groups:
            out.append(flat[offset : offset + len(group["params"])])
            offset += len(group["params"])
        return out

    def _extra_state(self) -> dict[str, Any]:
        if not self._generators:  # created now as it would be later: same seed, same state
            self.generator(self.flat_params()[0].device)
        return {
            "step_count": self.step_count,
            "seed": self.seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self.step_count = int(extra["step_count"])
        self.seed = int(extra["seed"])
        self._generators = {}
        for key, state in extra["generators"].items():
            self.generator(torch.device(key)).set_state(state.cpu())


def after_dropped(params: list[Tensor], unchanged: str) -> str:
    """How a warning about a dropped, non-finite refresh ends: ``unchanged`` (what the
    drop spared) and "Training continues." while the loss gradient in ``p.grad`` of
    ``params`` is finite; else that it is not, so that the base step spreads it, and what to
    check."""
    grads = [local_shard(p.grad) for p in params if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
        return f" and {unchanged}. Training continues."
    return (
        ", but the loss gradient in p.grad is not finite either: the batch or the loss "
        "holds NaN/Inf, and the base optimizer's step writes it into the weights. Check "
        "the inputs (torch.isfinite(x).all()) and the loss before step(); under mixed "
        "precision, a torch.amp.GradScaler skips such steps"
    )


def load_per_param(
    saved: list[Tensor | None] | None,
    params: list[Tensor],
    what: str,
    dtype: Callable[[Tensor], Any],
) -> list[Tensor | None] | None:
    """A saved per-parameter list, moved to each parameter's device and ``dtype(p)``."""
    if saved is None:
        return None
    if len(saved) != len(params):
        raise ValueError(
            f"the saved {what} has {len(saved)} entries but the optimizer has "
            f"{len(params)} parameters; load a state_dict of the same model"
        )
    return [
        None if c is None else c.to(device=p.device, dtype=dtype(p)) for c, p in zip(saved, params)
    ]


def check_alone(module: nn.Module, batch: Batch, output_fn: OutputFn | None, owner: str) -> None:
    """The model on the first and the last example of ``batch`` alone must reproduce their
    outputs in the whole batch (:func:`~fisher_optim.curvature.examples.check_examples_alone`),
    and the batch's output must have a batch dimension."""
    n = batch.num_examples()
    whole = model_output(module(*batch.args, **batch.kwargs), output_fn)
    check_batched(whole, n)
    alone = {}
    for i in probe_indices(n):
        part = batch.slice(i, i + 1)
        alone[i] = model_output(module(*part.args, **part.kwargs), output_fn)
    dtype = torch.promote_types(whole.dtype, torch.float32)
    check_examples_alone(
        [(i, whole[i : i + 1].to(dtype), a.to(dtype)) for i, a in alone.items()], n, owner
    )


def _no_forward(owner: str, model: nn.Module) -> str:
    """The error of a step without a captured forward, with a hint at submodules."""
    children = [name for name, _ in model.named_children()][:3]
    hint = (
        f". It sees the calls of the module it was built on ({type(model).__name__}) only: if "
        f"the training loop calls a submodule of it directly (such as model.{children[0]}(x)), "
        "build the optimizer on that submodule"
        if children
        else ""
    )
    return (
        f"{owner} has seen no training-mode forward of the model since the last step: call "
        f"the model (in train mode, with grad enabled) before step(){hint}"
    )


def _initialises_state(wrapper: GradientWrapper) -> bool:
    """Whether this step is the one ``torch.distributed.checkpoint.state_dict`` takes to
    create an empty optimizer state: no forward since the last step, no state yet, every
    ``lr`` 0 and every gradient zero. It goes to the base optimizer alone, uncounted."""
    if wrapper._batch is not None or wrapper.state:
        return False
    if any(g.get("lr", 1.0) != 0 for g in wrapper.param_groups):
        return False
    grads = [local_shard(p.grad) for p in wrapper.flat_params() if p.grad is not None]
    return bool(grads) and not any(bool(g.any()) for g in grads)


def clip_full_gradient(params: list[Tensor], max_norm: float) -> Tensor | None:
    """Clip the full gradient (the loss's plus what the wrapper added) of ``params`` to
    ``max_norm``, exactly as ``torch.nn.utils.clip_grad_norm_`` would; its norm before, or
    None if no parameter has a gradient.

    Clipping in the training loop (by hand, ``Trainer``'s ``max_grad_norm``, Lightning's
    ``gradient_clip_val``) runs before ``step()`` and so sees only the loss gradient; this
    bounds the gradient the base optimizer applies. Gradients are unscaled here (a
    ``GradScaler`` unscales before calling ``step``).
    """
    params = [p for p in params if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm) if params else None


def _not_ddp(owner: str) -> str:
    """The warning of a wrapper in a process group whose model is not DDP."""
    return (
        f"{owner} runs in a process group of {dist.get_world_size()} ranks, but its model is "
        "not DistributedDataParallel and was not called through a DDP wrapper: it treats "
        "the ranks as data-parallel replicas and averages its term over all of them, as "
        "under DDP. Build the optimizer on the DDP-wrapped model (with Accelerate: prepare "
        "the model first) to say so."
    )


def input_layout(batch: Batch) -> tuple[Any, ...]:
    """Shapes and dtypes of a call's tensor inputs (and the places of the others): what a
    check once per input layout is keyed by."""
    return tuple(
        (k, tuple(v.shape), v.dtype) if isinstance(v, Tensor) else (k, type(v).__name__)
        for k, v in [*enumerate(batch.args), *batch.kwargs.items()]
    )


def _ambiguous(batch: Batch) -> bool:
    """Whether a tensor input besides the first has the number of examples as its first
    dimension: it may be shared (see :mod:`fisher_optim.batch`)."""
    n = batch.num_examples()
    inputs = [*batch.args, *batch.kwargs.values()]
    return sum(holds_examples(v, n) for v in inputs) > 1


class _CaptureHook:
    """The forward pre-hook: hands the model's inputs to the wrapper, held by weak reference.

    A deep copy of the model (an EMA copy, say) gets this same object, which ignores every
    module but the wrapper's own model; the optimizer is neither copied nor kept alive.
    """

    def __init__(self, wrapper: GradientWrapper) -> None:
        self.wrapper = weakref.ref(wrapper)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        wrapper = self.wrapper()
        if wrapper is not None and module is wrapper.model:
            wrapper._capture(module, args, kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> _CaptureHook:
        return self


class _OwnPass:
    """Marks the wrapper's own forwards (not captured), reapplies training's autocast and
    runs them on a private random stream (torch's global state is restored on exit)."""

    def __init__(self, wrapper: GradientWrapper, autocast: bool) -> None:
        self.wrapper = wrapper
        device = wrapper._batch_device()
        self.cuda_index = device.index if device.type == "cuda" else None
        if self.cuda_index is None and device.type == "cuda":
            self.cuda_index = torch.cuda.current_device()
        self.rng = torch.random.fork_rng(
            devices=[] if self.cuda_index is None else [self.cuda_index]
        )
        # a distinct, reproducible stream per step (resumes identically from a checkpoint)
        self.rng_seed = (wrapper.seed * 1_000_003 + wrapper.step_count) % (2**63)
        state = wrapper._autocast
        if state is None:
            self.autocast = None
        elif autocast:
            self.autocast = torch.autocast(state[0], dtype=state[1])
        else:
            self.autocast = torch.autocast(state[0], enabled=False)

    def __enter__(self) -> None:
        self.rng.__enter__()
        torch.default_generator.manual_seed(self.rng_seed)
        if self.cuda_index is not None:
            torch.cuda.default_generators[self.cuda_index].manual_seed(self.rng_seed)
        self.wrapper._in_own_pass = True
        if self.autocast is not None:
            self.autocast.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.autocast is not None:
            self.autocast.__exit__(*exc)
        self.wrapper._in_own_pass = False
        self.rng.__exit__(*exc)


def check_max_grad_norm(value: Any) -> float | None:
    """``max_grad_norm``: None (no clipping) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"max_grad_norm must be a number (clip the full gradient to that norm) or None, "
            f"got {type(value).__name__} {value!r}"
        )
    if not 0 < value < float("inf"):
        raise ValueError(
            f"max_grad_norm must be a finite number > 0 (clip the full gradient to that norm) "
            f"or None (no clipping), got {value!r}"
        )
    return float(value)


def _build_base(
    model: nn.Module,
    base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
    base_kwargs: dict[str, Any],
    owner: type[GradientWrapper],
) -> torch.optim.Optimizer:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise TypeError(
                f"base_optimizer is an optimizer instance, so its hyperparameters are set "
                f"already; remove {sorted(base_kwargs)} or pass the optimizer class instead"
            )
        return base_optimizer
    if isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
        kwargs = dict(base_kwargs)
        _check_base_keywords(owner, base_optimizer, kwargs)
        params: Iterable[Any] = kwargs.pop("params", None) or model.parameters()
        return base_optimizer(params, **kwargs)
    raise TypeError(
        "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) or an "
        f"optimizer instance, got {base_optimizer!r}"
    )


def _check_base_keywords(
    owner: type[GradientWrapper], base: type[torch.optim.Optimizer], kwargs: dict[str, Any]
) -> None:
    """A keyword neither the wrapper nor the base optimizer takes (a typo such as ``evry=10``)
    is refused naming the wrapper and the closest keyword, not as the base's own error."""
    base_params = inspect.signature(base.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in base_params.values()):
        return  # the base takes any keyword: it judges them itself
    own = [
        name
        for name, p in inspect.signature(owner.__init__).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    ]
    check_keywords(
        f"{owner.__name__} (with base optimizer {base.__name__})",
        kwargs,
        [*own, *(name for name in base_params if name != "self")],
    )


def _check_trainable(base: torch.optim.Optimizer, owner: str) -> None:
    """Refuse an optimizer without a single trainable parameter (every one frozen)."""
    if not any(p.requires_grad for group in base.param_groups for p in group["params"]):
        raise ValueError(
            f"{owner}: every parameter of the model is frozen (requires_grad=False), so there "
            "is nothing to train and no gradient to edit. Unfreeze the parameters to train "
            "(p.requires_grad_(True)) before building the optimizer, or build it on those "
            "that train"
        )


#: Per model, the wrapper that stepped last and when (a tick of :data:`_CLOCK`).
_LAST_STEP: weakref.WeakKeyDictionary[nn.Module, tuple[Any, int]] = weakref.WeakKeyDictionary()
_WARNED_SHARED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_CLOCK = itertools.count()


def _check_one_wrapper(wrapper: GradientWrapper) -> None:
    """Warn once per model when two live wrappers that share parameters both step on it:
    each adds its own term to the same gradients. An optimizer that replaced another (the
    old one stepped last before the new one was built) is not warned about."""
    model = wrapper.model
    last = _LAST_STEP.get(model)
    _LAST_STEP[model] = (weakref.ref(wrapper), next(_CLOCK))
    if last is None or model in _WARNED_SHARED:
        return
    other = last[0]()
    if other is None or other is wrapper or last[1] < wrapper._born:
        return
    mine = {id(p) for p in wrapper.flat_params()}
    if not any(id(p) in mine for p in other.flat_params()):
        return
    _WARNED_SHARED.add(model)
    warnings.warn(
        f"{type(wrapper).__name__}: another optimizer on this model, a "
        f"{type(other).__name__}, steps too; both see the model's inputs and each adds its "
        "own term to the gradients of the parameters they share. Build one such optimizer "
        "per model (to replace one, stop stepping the old one)",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_no_key_collision(
    name: str, base: torch.optim.Optimizer, defaults: dict[str, Any]
) -> None:
    """The wrapper's own param-group keys must be keys the base optimizer does not use."""
    clash = sorted(set(defaults) & set(base.defaults))
    if clash:
        raise ValueError(
            f"{name} stores {clash} in every param group, but {type(base).__name__} already "
            f"uses that key for its own hyperparameter; the two would overwrite each other. "
            "Please report this base optimizer to fisher_optim."
        )


def _check_params_in_model(model: nn.Module, base: torch.optim.Optimizer) -> None:
    known = {id(p) for p in model.parameters()}
    for i, group in enumerate(base.param_groups):
        for p in group["params"]:
            if id(p) not in known:
                raise ValueError(
                    f"param_groups[{i}] holds a parameter of shape {tuple(p.shape)} that is not "
                    "a parameter of model; build the optimizer on model.parameters() "
                    "(or on param groups made of them)"
                )
