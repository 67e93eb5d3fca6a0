"""Checkpoint loading with clear errors.

* :func:`explain_weight_fetch_errors`: detectron2 downloads ``detectron2://`` / ``http(s)://``
  weights through iopath; without a network that ends in a bare ``<urlopen error [Errno -2] Name
  or service not known>`` that names neither the file nor a way out. This turns it into one
  error that does.
* :class:`InferenceCheckpointer`: loading trained weights for evaluation or the demo. detectron2
  only warns when a checkpoint does not fit the model (other shapes, missing parameters) and
  leaves those parameters randomly initialised, which for inference means plausible-looking
  but meaningless predictions. This checkpointer refuses such a checkpoint and says what differs.
* :class:`SegCLIPCheckpointer` (training, and the base of the one above): checkpoints are
  written atomically (temp file in the same folder, fsync, rename; ``last_checkpoint`` updated
  only after the rename, itself atomically), a truncated or corrupt file is an error naming it,
  and ``resume`` falls back past a corrupt checkpoint to the newest intact one, saying so.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from segclip_d2.errors import UserError
from segclip_d2.utils.atomic import atomic_output, remove_stale_temps

from .files import CorruptCheckpointError, check_finite, detectron2_layout, read_checkpoint

__all__ = [
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "InferenceCheckpointer",
    "ModelCardCheckpointer",
    "SegCLIPCheckpointer",
    "WeightsUnavailableError",
    "explain_weight_fetch_errors",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


class SegCLIPCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and a resume that survives corrupt files."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        os.makedirs(self.save_dir, exist_ok=True)
        if not getattr(self, "_cleaned", False):  # temps of a run killed while saving
            remove_stale_temps(self.save_dir)
            self._cleaned = True
        with atomic_output(save_file) as tmp:
            torch.save(data, tmp)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_output(os.path.join(self.save_dir, LAST_CHECKPOINT)) as tmp:
            tmp.write_text(last_filename_basename)

    def _load_file(self, filename):
        """The file through the one safe reader (:mod:`.files`: no pickle runs code), in the
        layout detectron2 expects."""
        return detectron2_layout(read_checkpoint(filename), filename)

    def resume_candidates(self) -> list[str]:
        """Checkpoints of ``save_dir`` to resume from, best first: the one ``last_checkpoint``
        names, then the other ``*.pth`` files, newest first."""
        tagged = self.get_checkpoint_file() if self.has_checkpoint() else ""
        others = [
            p
            for p in glob.glob(os.path.join(self.save_dir, "*.pth"))
            if os.path.abspath(p) != os.path.abspath(tagged)
        ]
        others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
        return ([tagged] if tagged else []) + others

    def resume_or_load(self, path: str, *, resume: bool = True):
        """Resume from the newest intact checkpoint of ``save_dir`` (when ``resume`` and there
        is one), else load ``path`` (model only). A corrupt checkpoint is skipped with a
        warning naming it; when none is intact this is a :class:`CorruptCheckpointError`."""
        if not (resume and self.has_checkpoint()):
            return self.load(path, checkpointables=[])
        with contextlib.suppress(OSError):
            remove_stale_temps(self.save_dir)
        bad = []
        for cand in self.resume_candidates():
            if not os.path.isfile(cand):
                bad.append((cand, "missing"))
                logger.warning(f"--resume: {cand} (named by {LAST_CHECKPOINT}) does not exist")
                continue
            try:
                checkpoint = self.load(cand)
            except CorruptCheckpointError as e:
                bad.append((cand, e.what))
                logger.warning(f"--resume: skipping {cand}: {e.what}")
                continue
            if bad:
                logger.warning(
                    f"--resume: resumed from {cand}, the newest intact checkpoint "
                    f"(skipped: {', '.join(os.path.basename(b) for b, _ in bad)})"
                )
            else:
                logger.info(f"--resume: resumed from {cand}")
            return checkpoint
        raise CorruptCheckpointError(
            os.path.join(self.save_dir, LAST_CHECKPOINT),
            "no intact checkpoint to resume from ("
            + "; ".join(f"{os.path.basename(b)}: {why}" for b, why in bad)
            + ")",
            "delete the broken files to start from MODEL.WEIGHTS, or run without --resume",
        )


class WeightsUnavailableError(UserError, RuntimeError):
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
            f"MODEL.WEIGHTS {weights}",
            f"could not be downloaded ({type(e).__name__}: {e})",
            "without network access, copy the file to this machine and pass its local path (e.g. "
            "`MODEL.WEIGHTS /path/to/R-50.pkl` on the train_net.py command line, or "
            "`--opts MODEL.WEIGHTS /path/to/model_final.pth` for demo/demo.py), or set "
            'MODEL.WEIGHTS "" to start from random initialisation',
        ) from e


def _first(items: list[str], n: int, sep: str) -> str:
    """The first ``n`` items joined, with ", ..." when there are more."""
    return sep.join(items[:n]) + (", ..." if len(items) > n else "")


class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint loaded for inference does not provide every parameter of the model."""


class InferenceCheckpointer(SegCLIPCheckpointer):
    """``DetectionCheckpointer`` for evaluation and the demo: every parameter and buffer of the
    model must come from the checkpoint with its shape, else :class:`CheckpointMismatchError`
    names the file and the differences (extra entries in the checkpoint are only logged)."""

    def load(self, path: str, checkpointables=None):
        self._loading = path
        with explain_weight_fetch_errors(path):
            extra = super().load(path, checkpointables)
        self.card = None
        if path:  # the model card's stored text embeddings replace the CLIP text tower
            from .card import CARD_KEY, apply_model_card, check_card

            self.card = (extra or {}).get(CARD_KEY)
            if self.card is not None:
                check_card(self.card, f"checkpoint {path}")
            apply_model_card(self.model, self.card, source=f"checkpoint {path}")
        return extra

    def __init__(self, model, save_dir="", *, preloaded: dict | None = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        # {path: content of read_checkpoint(path)}: files the caller already read (once)
        self._preloaded = dict(preloaded or {})

    def _load_file(self, filename):
        """Also refuses non-finite weights (a diverged training), naming the file."""
        data = self._preloaded.pop(filename, None)
        if data is None:
            data = read_checkpoint(filename)
        loaded = detectron2_layout(data, filename)
        check_finite(loaded["model"], filename)
        return loaded

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
            f"checkpoint {getattr(self, '_loading', '?')}",
            f"does not fit the model built from this config: of its parameters, "
            f"{' and '.join(parts)}",
            "use the config it was trained with (train_net.py saves it as config.yaml next to "
            "the checkpoints); a backbone initialisation such as R-50.pkl is for training, not "
            "for evaluation",
        )


class ModelCardCheckpointer(SegCLIPCheckpointer):
    """:class:`SegCLIPCheckpointer` (atomic saves) whose every ``save`` also stores
    ``card_fn(extra)`` as the checkpoint's model card (``extra``: the keyword data of that save,
    e.g. ``iteration``)."""

    def __init__(self, model, save_dir="", *, card_fn, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self._card_fn = card_fn

    def save(self, name: str, **kwargs) -> None:
        from .card import CARD_KEY

        if self.save_dir and self.save_to_disk:
            kwargs.setdefault(CARD_KEY, self._card_fn(dict(kwargs)))
        super().save(name, **kwargs)
