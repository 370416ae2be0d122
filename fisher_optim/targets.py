"""Which rows of the logits have a target: the rows that may enter ``Tr(F_B)`` and ``Tr(F)``.

The penalty and the Fisher measurements flatten logits ``[..., C]`` to rows ``[N, C]`` and draw
one label per row from the model (FP paper, Eq. 2/3). A row whose position has no target in
training (a padding token, a prompt token labelled ``-100``, the last position of a causal
language model, which has no next token) must not be one of the ``N`` rows: its sampled
label and gradient would be penalised although no loss ever trains that position. This module
decides, for one model call, which rows have a target:

* **any model**, explicitly: ``target_mask=fn``, called exactly like the model
  (``fn(*args, **kwargs)`` with the model's own inputs), returns a boolean tensor shaped like
  the logits without their class dimension (``[B, T]`` for ``[B, T, V]`` logits; ``[N]``
  flat rows are accepted too), ``True`` where the row has a target, or ``None`` for "every
  row". It replaces the automatic rules below.
* **Hugging Face models** (a ``transformers.PreTrainedModel``), automatically, mirroring the
  loss the model computes itself:

  - *causal language models* (``loss_type`` ``"ForCausalLM"`` or ``"ForConditionalGeneration"``,
    or a class named ``...LMHeadModel``; never an encoder-decoder): the logits at position ``t`` predict token
    ``t + 1`` (``transformers.loss.loss_utils.ForCausalLMLoss`` pads ``labels`` with ``-100``
    and shifts them left). Row ``t`` has a target iff ``shift_labels[t] != -100`` when
    ``shift_labels`` is passed, else iff ``labels[t + 1] != -100`` when ``labels`` is passed
    (the last position never has one), else iff the tokens ``t`` and ``t + 1`` are both real
    (``attention_mask`` 1), else iff ``t`` is not the last position;
  - *every other model* (masked LM, token and sequence classification, encoder-decoder):
    row ``t`` has a target iff ``labels[t] != -100`` when integer ``labels`` shaped like the
    rows are passed, else iff its token is real (``attention_mask``, or
    ``decoder_attention_mask`` for encoder-decoder models, shaped like the rows), else every
    row has one.

* **any other model without** ``target_mask``: every row has a target (the penalty of the
  FP paper; for a language model that includes padded positions: pass ``target_mask``).

The inputs are read by name from the captured call (keywords, or positionals bound to
``forward``'s signature). The model is recognised by its class, unwrapped from DDP and
``torch.compile``: a Hugging Face model called inside a module of your own is "any other
model". An ``attention_mask`` with values other than 0 and 1 (an additive mask) raises.

>>> import torch
>>> causal_target_rows((2, 4), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
tensor([[ True,  True,  True, False],
        [ True, False, False, False]])
>>> causal_target_rows((1, 4), labels=torch.tensor([[-100, -100, 7, 8]]))
tensor([[False,  True,  True, False]])
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fisher_optim._modules import unwrap
from fisher_optim.batch import Inputs, model_inputs
from fisher_optim.validate import check_function_or_none

#: ``target_mask``: called like the model, returns a boolean row mask (or None: every row).
TargetMask = Callable[..., Tensor | None]

#: The label HF losses (and ``F.cross_entropy``) ignore.
IGNORE_INDEX = -100


def target_rows(
    model: nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    logits_shape: Sequence[int],
    target_mask: TargetMask | None = None,
) -> Tensor | None:
    """The rows of ``model(*args, **kwargs)``'s logits that have a target (see the module).

    Args:
        model: the model called (unwrapped from DDP / ``torch.compile``).
        args, kwargs: the inputs of that call.
        logits_shape: the shape of its logits ``[..., C]`` before flattening.
        target_mask: the explicit rule (see the module), or None for the automatic one.

    Returns:
        A boolean tensor of shape ``logits_shape[:-1]``, ``True`` where the row has a target,
        or None when every row has one. Flattened (``reshape(-1)``) it indexes the rows of
        ``as_logits``.
    """
    rows_shape = tuple(logits_shape[:-1])
    if target_mask is not None:
        check_function_or_none("target_mask", target_mask)
        return _check_mask(target_mask(*args, **kwargs), rows_shape)
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if not is_hugging_face(model):
        return None
    named = _named_inputs(model, args, kwargs)
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    mask = _binary(named.get(mask_key), rows_shape, mask_key)
    if is_causal_lm(model):
        return causal_target_rows(
            rows_shape,
            attention_mask=mask,
            labels=_integer(named.get("labels"), rows_shape),
            shift_labels=_integer(named.get("shift_labels"), rows_shape),
        )
    labels = _integer(named.get("labels"), rows_shape)
    if labels is not None:
        return labels != IGNORE_INDEX
    return None if mask is None else mask.bool()


def causal_target_rows(
    rows_shape: Sequence[int],
    *,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    shift_labels: Tensor | None = None,
) -> Tensor:
    """Rows ``[B, T]`` of a causal LM that have a next-token target (HF's shift, see module).

    Usable as ``target_mask`` of a causal LM of your own, e.g. ``target_mask=lambda input_ids,
    attention_mask: causal_target_rows(input_ids.shape, attention_mask=attention_mask)``.
    """
    if shift_labels is not None:
        return shift_labels != IGNORE_INDEX
    if labels is not None:
        nxt = labels[..., 1:] != IGNORE_INDEX
    elif attention_mask is not None:
        real = attention_mask.bool()
        nxt = real[..., :-1] & real[..., 1:]
    else:
        nxt = torch.ones((*rows_shape[:-1], rows_shape[-1] - 1), dtype=torch.bool)
    last = torch.zeros((*nxt.shape[:-1], 1), dtype=torch.bool, device=nxt.device)
    return torch.cat([nxt, last], dim=-1)


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return base is not None and isinstance(model, base)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether a Hugging Face model shifts its labels (a causal / decoder-only LM).

    True for ``loss_type`` ``"ForCausalLM"`` (``LlamaForCausalLM`` and the like) and
    ``"ForConditionalGeneration"`` (decoder-only multimodal models such as Llava), which
    ``transformers`` maps to its shifting ``ForCausalLMLoss``, and for the older
    ``...LMHeadModel`` classes (``GPT2LMHeadModel``, ``BertLMHeadModel``), whose losses shift;
    never for encoder-decoder models (``config.is_encoder_decoder``: T5, BART, Whisper), whose
    logits line up with their labels.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    shifting = ("ForCausalLM", "ForConditionalGeneration")
    return getattr(model, "loss_type", None) in shifting or name.endswith("LMHeadModel")


def _named_inputs(model: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's inputs by parameter name (positional ones bound to ``forward``'s signature)."""
    if not args:
        return dict(kwargs)
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    named = dict(bound.arguments)
    for key, value in list(named.items()):  # a **kwargs parameter binds as a dict
        param = bound.signature.parameters.get(key)
        if param is not None and param.kind is inspect.Parameter.VAR_KEYWORD:
            named.pop(key)
            named.update(value)
    return named


def _integer(value: Any, rows_shape: tuple[int, ...]) -> Tensor | None:
    """``value`` if it is an integer tensor shaped like the rows (class labels), else None."""
    is_labels = (
        isinstance(value, Tensor) and not value.is_floating_point() and value.dtype != torch.bool
    )
    return value if is_labels and tuple(value.shape) == rows_shape else None


def _binary(value: Any, rows_shape: tuple[int, ...], name: str) -> Tensor | None:
    """A 0/1 mask shaped like the rows, else None; other values (an additive mask) raise."""
    if not isinstance(value, Tensor) or tuple(value.shape) != rows_shape:
        return None
    if value.dtype != torch.bool and not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(
            f"{name} has values other than 0 and 1, so it is not a padding mask (1 = token, "
            "0 = padding); pass target_mask=... that says which rows have a target"
        )
    return value


def _check_mask(mask: Any, rows_shape: tuple[int, ...]) -> Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"target_mask must return a boolean tensor (True = the row has a target) or None, "
            f"got {got}; convert with .bool()"
        )
    if tuple(mask.shape) == rows_shape:
        return mask
    if mask.dim() == 1 and mask.numel() == _prod(rows_shape):
        return mask.reshape(rows_shape)
    raise ValueError(
        f"target_mask returned a mask of shape {tuple(mask.shape)}, but the logits have rows "
        f"of shape {rows_shape} (the logits' shape without the class dimension); return one "
        "entry per row"
    )


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# ------------------------------------------------------------------ rows of a batch's logits


def _core(model: nn.Module) -> nn.Module:
    """The module behind DDP / ``torch.compile`` wrappers (what the target rules inspect)."""
    return getattr(unwrap(model), "_orig_mod", unwrap(model))


def target_row_mask(
    model: nn.Module, x: Inputs, n: int, rows: int, target_mask: TargetMask | None = None
) -> Tensor | None:
    """``[n, rows]``: which logit rows of ``model(x)`` have a target, or None for all.

    The conventions of :mod:`fisher_optim.targets` (Hugging Face models: padding,
    labels ``-100``, the causal shift; every row for other models; or the explicit
    ``target_mask``, called like the model), for logits of ``n`` examples with ``rows``
    rows each (``[n, C]`` when ``rows == 1``, except for a causal language model, whose
    logits are always ``[n, T, V]``).
    """
    args, kwargs = model_inputs(x)
    shape = (*rows_shape(model, n, rows), 1)
    mask = target_rows(_core(model), args, kwargs, shape, target_mask)
    return None if mask is None else mask.reshape(n, rows)


def rows_shape(model: nn.Module, n: int, rows: int) -> tuple[int, ...]:
    """The shape of the logits without their class dimension, for ``n`` examples of
    ``rows`` rows each: ``(n,)`` for one row (a classifier), else ``(n, rows)``; always
    ``(n, rows)`` for a Hugging Face causal language model (logits ``[B, T, V]``)."""
    return (n, rows) if rows > 1 or is_causal_lm(_core(model)) else (n,)


def row_targets(
    model: nn.Module,
    x: Inputs,
    y: Tensor,
    rows_shape: tuple[int, ...],
    target_mask: TargetMask | None = None,
) -> Tensor:
    """The true class of every logit row (``rows_shape``), ``IGNORE_INDEX`` where it has none.

    ``y`` holds one class per row; for a Hugging Face causal language model it is the
    model's ``labels`` (unshifted, the Hugging Face convention) and row ``t`` gets
    ``y[t + 1]``, the last row none. Rows that :mod:`fisher_optim.targets` finds without
    a target (padding, ..., or where ``target_mask`` says so) get ``IGNORE_INDEX`` too.
    """
    numel = 1
    for s in rows_shape:
        numel *= s
    if y.numel() != numel:
        raise ValueError(
            f"targets of shape {tuple(y.shape)} for logits with rows {tuple(rows_shape)}: "
            "pass one class index per row of the logits"
        )
    y = y.reshape(rows_shape)
    core = _core(model)
    if is_hugging_face(core) and is_causal_lm(core) and len(rows_shape) > 1:
        pad = torch.full((*rows_shape[:-1], 1), IGNORE_INDEX, dtype=y.dtype, device=y.device)
        y = torch.cat([y[..., 1:], pad], dim=-1)
    args, kwargs = model_inputs(x)
    mask = target_rows(core, args, kwargs, (*rows_shape, 1), target_mask)
    return y if mask is None else torch.where(mask.to(y.device), y, IGNORE_INDEX)


def drop_untargeted(labels: Tensor, has_target: Tensor | None) -> Tensor:
    """Sampled ``labels`` (``[..., rows]``) set to ``IGNORE_INDEX`` where a row has no target
    (``has_target`` from :func:`target_rows`, None for all), so that ``ℓ_i`` leaves them out.

    >>> drop_untargeted(torch.tensor([3, 4, 5]), torch.tensor([True, False, True])).tolist()
    [3, -100, 5]
    """
    if has_target is None:
        return labels
    keep = has_target.reshape(-1).to(labels.device)
    return labels.masked_fill(~keep, IGNORE_INDEX)
