"""Import Feast (through :mod:`ranker.materialize`) without the PyTorch it does not need.

Feast imports torch at start-up (a second or two of CPU) only for on-demand views over tensors,
which reelrank does not define; with ``import torch`` failing, its import guard runs Feast as on
an installation without torch. Imports after this one find torch as usual.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def _without_torch() -> Iterator[None]:
    """Make ``import torch`` fail inside the block unless torch is loaded already."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None
    try:
        yield
    finally:
        if sys.modules.get("torch", False) is None:
            del sys.modules["torch"]


def materialize_module() -> ModuleType:
    """:mod:`ranker.materialize`, imported with torch blocked."""
    with _without_torch():
        from ranker import materialize

    return materialize
