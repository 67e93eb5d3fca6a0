"""Run an exported SegCLIP ONNX model with onnxruntime: numpy and onnxruntime only, no torch.

    from segclip_d2.deploy.onnx_predictor import OnnxSegmenter

    seg = OnnxSegmenter("model.onnx")
    probs = seg.predict_probs(rgb)          # (K, H, W) float32 for an (H, W, C) image of seg.bands
    ids = probs.argmax(0)                   # class ids; seg.class_names[i] names class i

Everything the model needs is read from the file: the tile size S and the band count C from the
input shape, the class names, the normalisation (C values) and the model card (its
``input.bands`` name the C bands, RGB when absent) from ``metadata_props`` (see
:mod:`segclip_d2.deploy.export`). Images of any size are predicted in windows of S pixels every
``stride`` pixels (default 2/3 S, the sliding-window convention of the PyTorch path's configs),
averaging the probabilities where windows overlap; windows hanging over the border are padded
with the pixel mean (zero after normalisation), as the PyTorch inferencer pads.
"""

from __future__ import annotations

import json
import os

import numpy as np

from segclip_d2.checkpoint.card import card_bands, card_values
from segclip_d2.errors import UserError
from segclip_d2.predict.windows import window_starts

IGNORE_LABEL = 255  # segclip_d2.data.dataset_facts.IGNORE_LABEL (no torch import here)


class OnnxSegmenter:
    """An exported SegCLIP model in an onnxruntime CPU session.

    Args:
        path: the ``.onnx`` file written by ``tools/export_onnx.py``.
        threads: intra-op threads (0: onnxruntime's default, one per core).
        stride: window step in pixels (default ``2 * S // 3``).
        batch_size: windows per ``session.run``.
    """

    def __init__(self, path: str, threads: int = 0, stride: int | None = None, batch_size: int = 1):
        import onnxruntime as ort

        self.path = str(path)
        if not os.path.isfile(self.path):
            raise UserError(
                self.path, "no such ONNX model file", "export one with tools/export_onnx.py"
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                self.path, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(
                self.path, f"onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(outputs) != 1 or len(shape) != 4 or not _positive(shape[1]):
            raise UserError(self.path, "is not a SegCLIP export (one (B, C, S, S) input expected)")
        if not (isinstance(shape[2], int) and shape[2] == shape[3]):
            raise UserError(self.path, f"input shape {shape} is not a static square tile")
        self.input_name = inputs[0].name
        self.tile_size = int(shape[2])
        raw = self.session.get_modelmeta().custom_metadata_map
        try:
            self.metadata = {k: json.loads(v) for k, v in raw.items()}
        except json.JSONDecodeError as e:
            raise UserError(self.path, f"metadata is not JSON-encoded ({e})") from e
        missing = [
            k for k in ("class_names", "standardization_mean", "standardization_std")
            if k not in self.metadata
        ]  # fmt: skip
        if missing:
            raise UserError(self.path, f"metadata lacks {missing}", "re-export the model")
        names = self.metadata["class_names"]
        self.class_names = [names[k] for k in sorted(names, key=int)]
        self.mean = np.asarray(self.metadata["standardization_mean"], np.float32) * 255.0
        self.std = np.asarray(self.metadata["standardization_std"], np.float32) * 255.0
        self.card = self.metadata.get("segclip_model_card") or {}
        self._read_bands(int(shape[1]))
        colors = self.card.get("colors") or []
        if len(colors) != len(self.class_names) or self.card.get("class_names") != self.class_names:
            colors = _palette(len(self.class_names))
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.stride = int(stride) if stride else max(1, 2 * self.tile_size // 3)
        if not 0 < self.stride <= self.tile_size:
            raise UserError("--onnx-stride", f"must be in 1..{self.tile_size}, got {self.stride}")
        self.batch_size = max(1, int(batch_size))

    def _read_bands(self, channels: int) -> None:
        """``bands``, ``values`` from the card; UserError when they or the normalisation do not
        match the input's ``channels``."""
        self.bands, self.values = card_bands(self.card), card_values(self.card)
        counts = {len(self.bands), self.mean.size, self.std.size}
        if counts != {channels}:
            raise UserError(
                self.path,
                f"the input has {channels} channels but the card names {len(self.bands)} bands "
                f"({','.join(self.bands)}) and the metadata has {self.mean.size}/{self.std.size} "
                "standardization values",
                "re-export the model with tools/export_onnx.py",
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return (
            f"OnnxSegmenter({self.path!r}, tile={self.tile_size}, stride={self.stride}, "
            f"classes={self.num_classes})"
        )

    def normalise(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, C) bands (RGB 0..255 for an RGB model) -> (B, C, S, S) float32 input."""
        x = (np.asarray(tiles, np.float32) - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def predict_batch(self, tiles: np.ndarray) -> np.ndarray:
        """(B, S, S, C) tiles -> (B, K, S, S) float32 probabilities."""
        return self.session.run(None, {self.input_name: self.normalise(tiles)})[0]

    def predict_probs(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, C) image of the model's bands -> (K, H, W) float32 probabilities (windows,
        see module doc)."""
        c = len(self.bands)
        if rgb.ndim != 3 or rgb.shape[2] != c:
            raise ValueError(f"expected an (H, W, {c}) image of {self.bands}, got {rgb.shape}")
        h, w = rgb.shape[:2]
        s = self.tile_size
        ph, pw = max(h, s), max(w, s)
        image = np.empty((ph, pw, c), np.float32)
        image[:] = self.mean  # padding = pixel mean = 0 after normalisation
        image[:h, :w] = rgb
        boxes = [(y, x) for y in window_starts(ph, s, self.stride)
                 for x in window_starts(pw, s, self.stride)]  # fmt: skip
        total = np.zeros((self.num_classes, ph, pw), np.float32)
        count = np.zeros((1, ph, pw), np.float32)
        for i in range(0, len(boxes), self.batch_size):
            chunk = boxes[i : i + self.batch_size]
            tiles = np.stack([image[y : y + s, x : x + s] for y, x in chunk])
            for (y, x), p in zip(chunk, self.predict_batch(tiles)):
                total[:, y : y + s, x : x + s] += p
                count[:, y : y + s, x : x + s] += 1.0
        return (total / count)[:, :h, :w]

    def __call__(self, rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The demo pipeline's predictor: bands (h, w, C) + validity (h, w) -> uint8 class ids
        (``IGNORE_LABEL`` where invalid) and (K, h, w) float32 probabilities (``None`` for a
        block without a valid pixel), as :class:`segclip_d2.predict.blocks.ClassPredictor`."""
        ids = np.full(rgb.shape[:2], IGNORE_LABEL, dtype=np.uint8)
        if not valid.any():
            return ids, None
        probs = self.predict_probs(rgb)
        pred = probs.argmax(0).astype(np.uint8)
        ids[valid] = pred[valid]
        return ids, probs


def _positive(dim) -> bool:
    return isinstance(dim, int) and dim > 0


def _palette(n: int) -> list[tuple[int, int, int]]:
    """Distinct deterministic colours (golden-ratio hues) when the card has none."""
    import colorsys

    out, hue = [], 0.0
    for _ in range(n):
        hue = (hue + 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out
