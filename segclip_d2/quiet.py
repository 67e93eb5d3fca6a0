"""Import-time warnings of dependencies that users can do nothing about, silenced narrowly.

fvcore (``fvcore.nn``, two loss functions) and detectron2 (``detectron2.modeling.box_regression``)
decorate functions with ``torch.jit.script`` when they are imported, and torch >= 2.10 answers
each with a ``FutureWarning`` ("`torch.jit.script` is deprecated"). segclip_d2 imports them
inside :func:`dependency_imports`, which ignores exactly that warning (message, category and the
torch module that issues it) for the duration of those imports only: later imports find the
modules loaded, and a ``torch.jit.script`` call of the user's own still warns.
``segclip_d2/__init__.py`` does this first, so every entry point that imports segclip_d2 before
detectron2 starts quietly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

# What torch.jit.script says, and where it says it (the warning's module is the one in torch).
JIT_SCRIPT_MESSAGE = r"`torch\.jit\.script` is deprecated"
JIT_SCRIPT_MODULE = r"torch\.jit\._script"


@contextlib.contextmanager
def dependency_imports() -> Iterator[None]:
    """Ignore the ``torch.jit.script`` deprecation FutureWarning inside this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=JIT_SCRIPT_MESSAGE, category=FutureWarning, module=JIT_SCRIPT_MODULE
        )
        yield
