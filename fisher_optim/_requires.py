"""The torch version fisher_optim needs: the floor, checked once at import, and the one helper
that names the version a feature needs.

The floor, ``MIN_TORCH``, is the one ``pyproject.toml`` declares (``torch>=2.6``) and the
release workflow tests. It is the first release with everything the library uses: the public
FSDP2 API (``torch.distributed.fsdp.fully_shard``, ``FSDPModule``) and
``torch.distributed.tensor.DTensor`` (2.6), ``nn.RMSNorm`` (2.4), ``torch.func`` (2.0) and
``torch.distributed.checkpoint.state_dict`` (2.2). A torch below it (installed with
``--no-deps``, or by another package manager) fails at ``import fisher_optim`` with an error
naming the version, rather than later with an ``AttributeError``.

>>> require_torch((2, 6), "FSDP2 (fully_shard)", found="2.5.1+cpu")
Traceback (most recent call last):
...
ImportError: FSDP2 (fully_shard) needs torch>=2.6, found torch 2.5.1+cpu: pip install "torch>=2.6"
>>> require_torch((2, 6), "FSDP2 (fully_shard)", found="2.13.0")
"""

from __future__ import annotations

import re

import torch

#: The oldest torch fisher_optim supports (pyproject.toml's ``torch>=2.6``).
MIN_TORCH = (2, 6)


def torch_version(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string (``"2.6.0+cpu"`` -> ``(2, 6)``)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"version={version!r} is not a torch version such as '2.6.0'")
    return int(match[1]), int(match[2])


def require_torch(version: tuple[int, int], feature: str, found: str | None = None) -> None:
    """Raise ``ImportError`` naming ``version`` when torch (or ``found``) is older.

    Args:
        version: ``(major, minor)``, the first torch release that has ``feature``.
        feature: what needs it, as the user knows it (``"FSDP2 (fully_shard)"``).
        found: the torch version to check; ``torch.__version__`` by default.
    """
    found = torch.__version__ if found is None else found
    if torch_version(found) < version:
        wanted = ".".join(map(str, version))
        raise ImportError(
            f'{feature} needs torch>={wanted}, found torch {found}: pip install "torch>={wanted}"'
        )


require_torch(MIN_TORCH, "fisher_optim")
