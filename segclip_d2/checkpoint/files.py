"""Reading checkpoint files without running the code a file may carry.

A pickle can name any Python callable and have the loader call it: opening such a file runs
whatever its author chose. Every checkpoint of the project is opened here, by one function:

* :func:`read_checkpoint`: ``.pth`` / ``.pt`` / ``.pyth`` files through
  ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers only); ``.pkl``
  files (detectron2 model-zoo and torchvision-converted backbones: dicts of numpy arrays) through
  :class:`PlainArrayUnpickler`, which rebuilds numpy arrays and builtin containers and nothing
  else. Anything else is a :class:`UntrustedCheckpointError` naming the file (one line, exit 2);
  a truncated or corrupt file is a :class:`CorruptCheckpointError`.
* :func:`check_finite`: refuse weights holding NaN or infinity (a diverged training).
* :func:`detectron2_layout`: the file's content in the layout detectron2's checkpointer expects.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile

from segclip_d2.errors import UserError

PICKLE_SUFFIXES = (".pkl", ".pickle")


class CorruptCheckpointError(UserError):
    """A checkpoint file that cannot be read (truncated by a kill, corrupt, not a checkpoint)."""


class UntrustedCheckpointError(UserError):
    """A checkpoint holding objects other than plain weights: opening it could run code."""


REFUSED_FIX = (
    "only files of plain weights are opened (tensors or numpy arrays in dicts and lists); "
    "save the model's state_dict with torch.save, or train it with train_net.py"
)

# (module, name) a .pkl may reference: numpy array / scalar / dtype reconstruction, the
# containers pickle cannot write inline, and the bytes encoding of protocol-2 pickles.
_PICKLE_GLOBALS = frozenset(
    [
        (core, name)
        for core in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    ]
    + [(core, "_frombuffer") for core in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")]
    + [("_codecs", "encode")]
    + [(b, n) for b in ("builtins", "__builtin__") for n in ("set", "frozenset", "bytearray")]
)


class PlainArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numpy scalars and builtin containers only; any
    other global (a class, ``os.system``, ...) is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id (not a plain pickle)")


def _plain_value(value, depth: int = 0) -> bool:
    """Whether ``value`` is plain data: numbers, strings, non-object numpy arrays, containers."""
    import numpy as np

    if depth > 20:
        return False
    if isinstance(value, np.ndarray | np.generic):
        return value.dtype.kind in "biufc"
    if value is None or isinstance(value, bool | int | float | complex | str | bytes):
        return True
    if isinstance(value, dict):
        return all(
            _plain_value(k, depth + 1) and _plain_value(v, depth + 1) for k, v in value.items()
        )
    if isinstance(value, list | tuple | set | frozenset | bytearray):
        return all(_plain_value(v, depth + 1) for v in value)
    return False


def _read_pickle(path: str) -> dict:
    """A ``.pkl`` of plain arrays (detectron2 / torchvision-converted weights)."""
    try:
        with open(path, "rb") as f:
            data = PlainArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if str(e).startswith("refused"):
            raise UntrustedCheckpointError(
                path, f"is not a pickle of plain arrays ({e}): refused, it could run code",
                REFUSED_FIX,
            ) from None  # fmt: skip
        raise CorruptCheckpointError(
            path, f"cannot be read as a pickle, it is truncated or corrupt ({e})"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CorruptCheckpointError(
            path, f"cannot be read as a pickle, it is truncated or corrupt ({e})"
        ) from None
    if not _plain_value(data):
        raise UntrustedCheckpointError(
            path, "holds objects other than numbers, strings and numeric arrays: refused",
            REFUSED_FIX,
        )  # fmt: skip
    return data


def _zip_intact(path: str) -> bool:
    """Whether ``path`` is a complete zip archive (torch's checkpoint format)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError):
        return False


def _weights_only_reason(error: BaseException) -> str | None:
    """torch's reason for refusing an object under ``weights_only``, or None for other errors."""
    text = " ".join(str(error).split())
    if "weights only" not in text.lower() and "weights_only" not in text:
        return None
    pattern = r"(?:WeightsUnpickler error: |Unpickler error: |Trying to load )(.*?)"
    pattern += r"(?:\.? Check the doc|$)"
    m = re.search(pattern, text)
    return (m.group(1).strip().rstrip(".") if m else "objects other than tensors")[:160]


def _read_torch(path: str) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError, AttributeError, TypeError, KeyError, IndexError) as e:  # fmt: skip
        reason = _weights_only_reason(e)
        refused_global = reason is not None and "global" in reason.lower()
        if refused_global or (reason is not None and _zip_intact(path)):
            raise UntrustedCheckpointError(
                path, f"holds objects other than plain weights ({reason}): refused, opening it "
                "could run code", REFUSED_FIX,
            ) from None  # fmt: skip
        first = reason or " ".join(str(e).split())[:160]  # not torch's weights_only advice
        raise CorruptCheckpointError(
            path,
            f"cannot be read as a checkpoint, it is truncated or corrupt ({first})",
            "use another checkpoint (an interrupted save leaves the previous ones intact)",
        ) from None


def read_checkpoint(path: str) -> dict:
    """The content of checkpoint ``path`` (a dict), read without running code (module doc).

    Raises :class:`UserError` for a missing file, :class:`CorruptCheckpointError` for an
    unreadable one, :class:`UntrustedCheckpointError` for one that holds anything but plain
    weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(path, "no such checkpoint file", "check the path")
    if path.endswith(PICKLE_SUFFIXES):
        data = _read_pickle(path)
    else:
        data = _read_torch(path)
    if not isinstance(data, dict):
        raise CorruptCheckpointError(
            path, f"is not a checkpoint (a dict of weights expected, found {type(data).__name__})"
        )
    return data


def detectron2_layout(data: dict, path: str) -> dict:
    """``data`` of :func:`read_checkpoint` as detectron2's checkpointer expects it: a dict
    with ``"model"`` (name -> weights), converted by name-matching heuristics for detectron2
    model-zoo / Caffe2 / pycls files, as ``DetectionCheckpointer._load_file`` does."""
    if path.endswith(PICKLE_SUFFIXES):
        if "model" in data and "__author__" in data:
            return data  # detectron2 model-zoo format
        blobs = data.get("blobs", data)  # Caffe2 / Detectron1 (detection models have "blobs")
        if not isinstance(blobs, dict):
            raise CorruptCheckpointError(path, "its 'blobs' entry is not a dict of weights")
        blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
        return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}
    if path.endswith(".pyth"):  # pycls
        if not isinstance(data.get("model_state"), dict):
            raise CorruptCheckpointError(path, "a pycls .pyth file needs a 'model_state' dict")
        state = {
            k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


def check_finite(state_dict: dict, path: str) -> None:
    """Refuse weights holding NaN or infinity (:class:`UserError` naming ``path`` and the
    first offending entries)."""
    import numpy as np
    import torch

    bad, total = [], 0
    for name, value in state_dict.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value) if value.dtype.kind in "fc" else None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        total += 1
        if not bool(torch.isfinite(value).all()):
            bad.append(str(name))
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise UserError(
            path,
            f"has non-finite weights (NaN or infinity) in {len(bad)} of {total} tensors ({shown})",
            "the training diverged before this save: use an earlier checkpoint",
        )
