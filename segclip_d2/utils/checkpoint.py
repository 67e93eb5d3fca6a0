"""A clear error when ``MODEL.WEIGHTS`` names a remote file that cannot be fetched.

detectron2 downloads ``detectron2://`` / ``http(s)://`` weights through iopath; without a network
that ends in a bare ``<urlopen error [Errno -2] Name or service not known>`` that names neither the
file nor a way out. :func:`explain_weight_fetch_errors` turns it into one error that does.
"""

from __future__ import annotations

import contextlib


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
