"""Event writers that create nothing until there is something to write."""

from __future__ import annotations

from detectron2.utils.events import JSONWriter
from detectron2.utils.file_io import PathManager


class LazyJSONWriter(JSONWriter):
    """detectron2's ``JSONWriter`` (``metrics.json``, one JSON object per line), but the file is
    opened on the first write: a run that fails before its first logged iteration (bad weights,
    a data error) leaves no empty ``metrics.json`` that looks like a finished run's."""

    def __init__(self, json_file: str, window_size: int = 20):
        self._path = json_file
        self._handle = None
        self._window_size = window_size
        self._last_write = -1

    @property
    def _file_handle(self):
        if self._handle is None:
            self._handle = PathManager.open(self._path, "a")
        return self._handle

    def close(self):
        if self._handle is not None:
            self._handle.close()
