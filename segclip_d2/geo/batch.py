"""Many rasters across many processes: the inputs of a run (expanded, never the run's own
outputs, one unique output name each), deterministic sharding over the ranks of a torchrun / srun
launch (the ranks, threads and gather: :class:`segclip_d2.launch.Launch`), and the run manifest
(what ``--skip-existing`` trusts).

Every rank predicts ``inputs[rank::world_size]`` (inputs in the order the command line expands
them, identical on every rank). At the end the ranks' records are gathered (gloo) and rank 0
writes ``run_manifest.json`` atomically: per input its outputs, status and seconds, plus the
model summary. A single process needs no process group.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..utils.atomic import atomic_output

logger = logging.getLogger(__name__)

MANIFEST = "run_manifest.json"
# SEGCLIP_DEMO_STOP_AFTER=N: the process sends itself SIGTERM after N inputs (tests: a kill at a
# known point instead of a race with the clock).
STOP_AFTER_ENV = "SEGCLIP_DEMO_STOP_AFTER"


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """The items of ``rank`` out of ``world_size``: every ``world_size``-th, from ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(items[rank::world_size])


def write_manifest(out_dir: str | Path, records: list[dict], summary: dict) -> Path:
    """``run_manifest.json`` in ``out_dir`` (temp file + rename)."""
    path = Path(out_dir) / MANIFEST
    body = {
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **summary,
        "inputs": records,
        "counts": {
            s: sum(1 for r in records if r["status"] == s) for s in ("done", "skipped", "failed")
        },
    }
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


def read_manifest(out_dir: str | Path) -> dict:
    """The previous run's records by input path (``{}`` when there is no readable manifest)."""
    path = Path(out_dir) / MANIFEST
    try:
        body = json.loads(path.read_text())
        return {r["input"]: r for r in body.get("inputs", []) if isinstance(r, dict)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s: unreadable (%s); --skip-existing redoes every input", path, e)
        return {}


def settings_key(settings: dict) -> str:
    """A short digest of everything that decides an input's outputs (model file and its size and
    time, vocabulary, GSD, bands, blocks, output flags)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_identity(path: str) -> dict:
    """Path, size and modification time of a model file (``{}`` for none or a URL)."""
    if not path or not os.path.isfile(path):
        return {"path": path}
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def reusable(previous: dict | None, record: dict, out_dir: str | Path) -> bool:
    """Whether ``previous`` (the last run's record of this input) made exactly the outputs
    ``record`` asks for, with the same settings, and they are all there."""
    if not previous or previous.get("status") not in ("done", "skipped"):
        return False
    if previous.get("settings") != record["settings"]:
        return False
    if previous.get("outputs") != record["outputs"]:
        return False
    return all(os.path.isfile(Path(out_dir) / n) for n in record["outputs"])


def output_stems(files: Sequence) -> list[str]:
    """One output name per input: the file's stem, or ``<stem>_<n>`` when the stem is already
    used in this run, with ``n`` chosen so that it is no other input's stem either."""
    taken = {Path(str(f)).stem for f in files}
    used: set[str] = set()
    stems = []
    for path in files:
        stem = Path(str(path)).stem
        if stem in used:
            n = 1
            while f"{stem}_{n}" in used or f"{stem}_{n}" in taken:
                n += 1
            logger.warning("%s: output name %s already used, writing %s_%d_*", path, stem, stem, n)
            stem = f"{stem}_{n}"
        used.add(stem)
        stems.append(stem)
    return stems


def expand_inputs(patterns, out_dir=None, is_output=None) -> tuple[list, list[tuple[str, str]]]:
    """Files of ``patterns`` (files, folders, globs, VRT mosaics; GDAL paths such as
    ``/vsicurl/...`` or ``s3://...`` are kept as given), in order, without duplicates, leaving
    out files in ``out_dir`` that ``is_output(name)`` calls the run's own; and ``(pattern,
    reason)`` for patterns that match nothing."""
    from ..raster.sources import IMAGE_EXTS, is_remote

    out = Path(out_dir).resolve() if out_dir is not None else None
    files: list = []
    missing: list[tuple[str, str]] = []
    for pat in patterns:
        p = Path(pat)
        if is_remote(pat) and not p.exists():
            found = [str(pat)]  # opened by GDAL; an unreachable source fails as that input
        elif p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif p.exists():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(pat, recursive=True) if Path(f).is_file())
        if out is not None and is_output is not None:
            own = [f for f in found if isinstance(f, Path) and f.resolve().parent == out]
            found = [f for f in found if not (f in own and is_output(f.name))]
        if not found:
            missing.append((pat, _nothing_found(p, pat)))
        files += [f for f in found if f not in files]
    return files, missing


def check_band_choice(files: Sequence, bands, model_bands, values) -> None:
    """Refuse the run (:class:`~segclip_d2.errors.UserError`: one line, exit 2, before anything
    is written) when an input's bands cannot be matched to the model's without ``--bands``, or
    ``--bands`` names a band an input lacks; decided from each file's header."""
    from ..errors import UserError
    from ..raster.sources import BandChoiceError, check_input_bands

    bad = []
    for path in files:
        try:
            check_input_bands(path, bands, model_bands, values)
        except BandChoiceError as e:
            bad.append((str(path), str(e).removeprefix(f"{path}: ")))
    if bad:
        path, what = bad[0]
        more = f" (and {len(bad) - 1} more input(s) alike)" if len(bad) > 1 else ""
        raise UserError(path, what + more)


def _nothing_found(p: Path, pattern: str) -> str:
    from ..raster.sources import IMAGE_EXTS

    if p.is_dir():
        return f"folder has no image files ({', '.join(IMAGE_EXTS)}) besides this run's outputs"
    if glob.has_magic(pattern):
        return "pattern matches no file"
    return "no such file or folder" if not p.exists() else "is one of this run's outputs"


def input_errors() -> tuple[type[BaseException], ...]:
    """Errors that fail one input and let the run go on: unreadable inputs (InputError is a
    ValueError), full or failing disks (OSError, GDAL's own write errors), pyogrio's
    (RuntimeError)."""
    from rasterio._err import CPLE_BaseError
    from rasterio.errors import RasterioError

    return (OSError, ValueError, RuntimeError, RasterioError, CPLE_BaseError)


class InputRun:
    """The inputs of one process, each predicted (or reused) and recorded for the manifest.

    An input that fails (unreadable, disk full while writing its outputs) is recorded as failed
    and the run goes on. ``settings`` (what decides the outputs) and ``summary`` (the manifest's
    header) are set by the caller; ``--skip-existing`` reuses an input's outputs only when the
    last manifest records them made with the same settings.
    """

    def __init__(self, out_dir, probs_fn, opts, gsd_policy):
        self.out_dir, self.probs_fn, self.opts = Path(out_dir), probs_fn, opts
        self.gsd_policy = gsd_policy
        self.bands, self.progress, self.skip_existing = None, False, False
        # the model's input band names and values (model_band_names): RGB rules when None
        self.model_bands, self.values = None, None
        self.settings: dict = {}
        self.summary: dict = {}
        self.records: list[dict] = []
        self._previous: dict | None = None

    def all(self, jobs, progressive: bool) -> list[dict]:
        """Process every ``(index, (path, stem))``; ``progressive``: rewrite the manifest after
        each input (one process), so a killed run keeps the record of what it finished."""
        import signal

        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        _ = self.previous  # read before this run rewrites the manifest
        if self.progress and len(jobs) > 1:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="inputs", unit="file")
        for index, (path, stem) in jobs:
            self.records.append(self.one(index, path, stem))
            if progressive:
                self.write_manifest(self.records, final=False)
            if stop_after and len(self.records) == stop_after:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.records

    def one(self, index, path, stem) -> dict:
        import time

        from ..raster.sources import is_raster_path, open_source
        from .outputs import expected_outputs, predict_to_outputs

        names = expected_outputs(stem, is_raster_path(path), self.opts)
        rec = {"index": index, "input": str(path), "outputs": names, "error": None}
        rec["settings"] = self.settings_key
        t0 = time.perf_counter()
        if self.skip_existing and reusable(self.previous.get(str(path)), rec, self.out_dir):
            logger.info("%s: outputs complete with these settings, skipped", path)
            return {**rec, "status": "skipped", "seconds": 0.0}
        try:
            src = open_source(path, self.bands, self.model_bands, self.values)
            try:
                scale = self.gsd_policy.scale_for(src)
                _, n = predict_to_outputs(src, self.probs_fn, self.out_dir, stem, self.opts, scale)
            finally:
                src.close()
            dt = time.perf_counter() - t0
            logger.info("%s: %dx%d, %d block(s), %.1f s", path, src.height, src.width, n, dt)
            rec["status"] = "done"
        except input_errors() as e:
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            logger.error("failed: %s", msg)
            rec.update(status="failed", error=msg)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec

    @property
    def settings_key(self) -> str:
        return settings_key(self.settings)

    @property
    def previous(self) -> dict:
        if self._previous is None:
            self._previous = read_manifest(self.out_dir) if self.skip_existing else {}
        return self._previous

    def write_legend(self, image) -> None:
        """``legend.png`` (RGB array); a disk that cannot take it is one line, before any input."""
        from ..errors import UserError
        from ..raster.writers import write_png

        try:
            write_png(self.out_dir / "legend.png", image)
        except OSError as e:
            raise UserError(
                str(self.out_dir / "legend.png"),
                f"could not be written ({e.strerror or e})",
                "free space or choose another --output",
            ) from None

    def write_manifest(self, records, final: bool) -> None:
        from ..errors import UserError

        try:
            write_manifest(self.out_dir, records, {**self.summary, "complete": final})
        except OSError as e:
            if final:
                raise UserError(
                    str(self.out_dir / MANIFEST),
                    f"could not be written ({e.strerror or e}); the outputs listed in the log "
                    "are complete",
                    "free space and rerun with --skip-existing",
                ) from None
            logger.warning("%s: not updated (%s)", MANIFEST, e.strerror or e)
