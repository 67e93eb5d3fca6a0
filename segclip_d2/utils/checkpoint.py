"""Checkpoint loading with clear errors.

* :func:`explain_weight_fetch_errors`: detectron2 downloads ``detectron2://`` / ``http(s)://``
  weights through iopath; without a network that ends in a bare ``<urlopen error [Errno -2] Name
  or service not known>`` that names neither the file nor a way out. This turns it into one
  error that does.
* :class:`InferenceCheckpointer`: loading trained weights for evaluation or the demo. detectron2
  only warns when a checkpoint does not fit the model (other shapes, missing parameters) and
  leaves those parameters randomly initialised, which for inference means plausible-looking
  but meaningless predictions. This checkpointer refuses such a checkpoint and says what differs.
"""

from __future__ import annotations

import contextlib

from detectron2.checkpoint import DetectionCheckpointer


class WeightsUnavailableError(RuntimeError):
    """``MODEL.WEIGHTS`` names a remote file that could not be downloaded."""


def is_remote(weights: str) -> bool:
    return "://" in weights and not weights.startswith("file://")


@contextlib.contextmanager
def explain_weight_fetch_errors(weights: str):
    """Re-raise a failed download of remote ``weights`` as :class:`WeightsUnavailableError`
    naming the file and the alternatives; anything else passes through unchanged."""
    try:
        yield
    except OSError as e:  # urllib.error.URLError, socket errors, HTTP errors
        if not is_remote(weights):
            raise
        raise WeightsUnavailableError(
            f"MODEL.WEIGHTS {weights}: could not be downloaded ({type(e).__name__}: {e}). "
            "Without network access, copy the file to this machine and pass its local path (e.g. "
            "`MODEL.WEIGHTS /path/to/R-50.pkl` on the train_net.py command line, or "
            "`--opts MODEL.WEIGHTS /path/to/model_final.pth` for demo/demo.py), or set "
            'MODEL.WEIGHTS "" to start from random initialisation.'
        ) from e


def _first(items: list[str], n: int, sep: str) -> str:
    """The first ``n`` items joined, with ", ..." when there are more."""
    return sep.join(items[:n]) + (", ..." if len(items) > n else "")


class CheckpointMismatchError(ValueError):
    """A checkpoint loaded for inference does not provide every parameter of the model."""


class InferenceCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` for evaluation and the demo: every parameter and buffer of the
    model must come from the checkpoint with its shape, else :class:`CheckpointMismatchError`
    names the file and the differences (extra entries in the checkpoint are only logged)."""

    def load(self, path: str, checkpointables=None):
        self._loading = path
        with explain_weight_fetch_errors(path):
            return super().load(path, checkpointables)

    def _log_incompatible_keys(self, incompatible) -> None:
        super()._log_incompatible_keys(incompatible)
        shapes = [
            f"{k}: {tuple(a)} in the checkpoint, {tuple(b)} in the model"
            for k, a, b in incompatible.incorrect_shapes
        ]
        reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k not in reshaped]
        if not shapes and not missing:
            return
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} with another shape ({_first(shapes, 3, '; ')})")
        if missing:
            parts.append(f"{len(missing)} missing ({_first(missing, 5, ', ')})")
        raise CheckpointMismatchError(
            f"checkpoint {getattr(self, '_loading', '?')} does not fit the model built from this "
            f"config: of its parameters, {' and '.join(parts)}. Use the config it was trained "
            "with (train_net.py saves it as config.yaml next to the checkpoints); a backbone "
            "initialisation such as R-50.pkl is for training, not for evaluation."
        )
