"""Dataset mappers: dataset dicts -> model inputs, with aerial-image augmentation.

Mapper output per image (interface D)::

    "image":      tensor (C, H, W) of the ``INPUT.BANDS`` in file order: uint8 for 8-bit images
                  (RGB PNG/JPEG, or all bands of a TIFF), float32 for 16-bit or float TIFFs
    "sem_seg":    int64 tensor (H, W), 255 = ignore            (when the split is labelled)
    "gt_classes": int64 tensor (T,), sorted present class ids  (training)
    "gt_masks":   bool tensor (T, H, W), one mask per class     (training)
    "height", "width": the original image size; "file_name"

The mapper is chosen by ``cfg.INPUT.DATASET_MAPPER_NAME`` from :data:`MAPPER_REGISTRY`
(:func:`build_train_mapper`, :func:`build_test_mapper`), never by dataset name.

Training augmentation (all geometric transforms keep image and label pixel-aligned: labels use
nearest-neighbour resizing and exact array rotations/flips):

1. random resize by a factor in ``INPUT.RESIZE_SCALE`` of the original size;
2. padding to at least the crop size (image 0, label 255) and a random ``INPUT.CROP.SIZE`` crop,
   redrawn up to 10 times while one class covers more than
   ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of the crop's non-ignored pixels;
3. horizontal flip, vertical flip (``INPUT.RANDOM_VFLIP``), a random multiple of 90 degrees
   (``INPUT.RANDOM_ROTATE90``);
4. photometric jitter (``INPUT.COLOR_AUG``): brightness, contrast, saturation, hue on the red,
   green and blue bands of 8-bit images; brightness and contrast on every other band;
5. padding to a multiple of ``MODEL.SEGCLIP.SIZE_DIVISIBILITY`` (image 0, label 255).
"""

from __future__ import annotations

import copy
import logging

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry
from fvcore.transforms.transform import (
    CropTransform,
    NoOpTransform,
    PadTransform,
    Transform,
)
from PIL import Image

from .bands import TIFF_SUFFIXES, check_band_names, read_tiff_bands, rgb_indices
from .dataset_facts import IGNORE_LABEL

logger = logging.getLogger(__name__)

MAPPER_REGISTRY = Registry("DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = (
    """Dataset mappers, built as ``MAPPER_REGISTRY.get(name)(cfg, is_train)``."""
)


# --------------------------------------------------------------------------- transforms
class Rot90Transform(Transform):
    """Rotate by ``k`` x 90 degrees counter-clockwise (``np.rot90``): exact, no interpolation."""

    def __init__(self, k: int, h: int, w: int):
        super().__init__()
        self._set_attributes(locals())
        self.k = int(k) % 4

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        # one counter-clockwise quarter turn of a (W, H) image maps (x, y) -> (y, W - x)
        coords = np.asarray(coords, dtype=np.float64).copy()
        w = self.w
        h = self.h
        for _ in range(self.k):
            x, y = coords[:, 0].copy(), coords[:, 1].copy()
            coords[:, 0], coords[:, 1] = y, w - x
            w, h = h, w
        return coords

    def inverse(self) -> Transform:
        h, w = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform((4 - self.k) % 4, h, w)


class BandwiseResizeTransform(T.ResizeTransform):
    """detectron2's resize for any number of bands: 8-bit images with other than 1 or 3 bands are
    resized band by band (PIL would take 4 bands as RGBA and premultiply by the "alpha")."""

    def apply_image(self, img, interp=None):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] in (1, 3):
            return super().apply_image(img, interp)
        bands = []
        for c in range(img.shape[2]):
            bands.append(super().apply_image(img[..., c : c + 1], interp))
        return np.concatenate(bands, axis=2)


class PhotometricTransform(Transform):
    """Brightness shift, contrast and saturation factors and a hue shift.

    On uint8 images the ``rgb`` bands (positions of red, green, blue; None: no visible bands)
    get all four; every other band (and every band of a non-uint8 image) gets the brightness and
    contrast only: a shift by ``brightness`` for uint8, a gain ``1 + brightness / 128`` otherwise,
    then the contrast factor around the band's mean. ``hue`` is in OpenCV hue units (0..180 per
    turn). Labels and coordinates are unchanged.
    """

    def __init__(
        self,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        rgb: tuple[int, int, int] | None = (0, 1, 2),
    ):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        assert img.ndim == 3, img.shape
        rgb = list(self.rgb) if self.rgb is not None and img.dtype == np.uint8 else None
        if rgb == [0, 1, 2] and img.shape[2] == 3:
            return self._jitter_rgb(img)
        out = self._jitter_bands(img)
        if rgb is not None:
            out[..., rgb] = self._jitter_rgb(np.ascontiguousarray(img[..., rgb]))
        return out

    def _jitter_bands(self, img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float32)
        x = x + self.brightness if img.dtype == np.uint8 else x * (1 + self.brightness / 128)
        if self.contrast != 1.0:
            mean = x.mean(axis=(0, 1))
            x = (x - mean) * self.contrast + mean
        if img.dtype != np.uint8:
            return x.astype(img.dtype)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def _jitter_rgb(self, img: np.ndarray) -> np.ndarray:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, img.shape
        x = img.astype(np.float32) + self.brightness
        if self.contrast != 1.0:
            mean = x.mean()
            x = (x - mean) * self.contrast + mean
        x = np.clip(x, 0, 255)
        if self.saturation != 1.0 or self.hue != 0.0:
            hsv = cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.float32)
            hsv[..., 0] = np.mod(hsv[..., 0] + self.hue, 180.0)
            hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 255)
            x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def inverse(self) -> Transform:
        return NoOpTransform()


# --------------------------------------------------------------------------- augmentations
class RandomScaleResize(T.Augmentation):
    """Resize by a factor drawn uniformly from ``[min_scale, max_scale]`` of the original size
    (bilinear image, nearest label)."""

    def __init__(self, min_scale: float, max_scale: float):
        super().__init__()
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"bad resize scale range ({min_scale}, {max_scale})")
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        s = np.random.uniform(self.min_scale, self.max_scale)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        if (nh, nw) == (h, w):
            return NoOpTransform()
        return BandwiseResizeTransform(h, w, nh, nw, Image.BILINEAR)


class PadToMinSize(T.Augmentation):
    """Pad bottom/right so the image is at least ``(min_h, min_w)``: image with
    ``pad_value``, label with ``seg_pad_value`` (ignore)."""

    def __init__(self, min_h: int, min_w: int, pad_value: int = 0, seg_pad_value: int = 255):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        h, w = image.shape[:2]
        dh, dw = max(0, self.min_h - h), max(0, self.min_w - w)
        if dh == 0 and dw == 0:
            return NoOpTransform()
        return PadTransform(0, 0, dw, dh, w, h, self.pad_value, self.seg_pad_value)


class RandomCropCategoryLimit(T.Augmentation):
    """Random ``(crop_h, crop_w)`` crop (the image must be at least that large), redrawn up to
    ``max_tries`` times while one class covers more than ``single_category_max_area`` of the
    crop's non-ignored pixels (the last draw is kept)."""

    def __init__(
        self,
        crop_h: int,
        crop_w: int,
        single_category_max_area: float = 1.0,
        ignore_label: int = IGNORE_LABEL,
        max_tries: int = 10,
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image, sem_seg):
        h, w = image.shape[:2]
        ch, cw = min(self.crop_h, h), min(self.crop_w, w)
        for _ in range(self.max_tries):
            y0 = np.random.randint(h - ch + 1)
            x0 = np.random.randint(w - cw + 1)
            if self.single_category_max_area >= 1.0 or sem_seg is None:
                break
            window = sem_seg[y0 : y0 + ch, x0 : x0 + cw]
            cnt = np.bincount(window.ravel(), minlength=256)
            cnt[self.ignore_label] = 0
            if cnt.sum() > 0 and cnt.max() < cnt.sum() * self.single_category_max_area:
                break
        return CropTransform(x0, y0, cw, ch)


class RandomRotate90(T.Augmentation):
    """Rotate by 0, 90, 180 or 270 degrees, uniformly."""

    def get_transform(self, image):
        h, w = image.shape[:2]
        k = np.random.randint(4)
        return Rot90Transform(k, h, w) if k else NoOpTransform()


class RandomPhotometric(T.Augmentation):
    """Each of brightness (shift in [-b, b]), contrast (factor in [1-c, 1+c]), saturation
    (factor in [1-s, 1+s]) and hue (shift in [-h, h] OpenCV units) applied with ``prob``."""

    def __init__(
        self,
        brightness: float = 32.0,
        contrast: float = 0.5,
        saturation: float = 0.5,
        hue: float = 18.0,
        prob: float = 0.5,
        rgb: tuple[int, int, int] | None = (0, 1, 2),
    ):
        super().__init__()
        self._init(locals())

    def get_transform(self, image):
        def draw(lo, hi, neutral):
            return np.random.uniform(lo, hi) if np.random.rand() < self.prob else neutral

        b = draw(-self.brightness, self.brightness, 0.0)
        c = draw(1 - self.contrast, 1 + self.contrast, 1.0)
        s = draw(1 - self.saturation, 1 + self.saturation, 1.0)
        hu = draw(-self.hue, self.hue, 0.0)
        if b == 0.0 and c == 1.0 and s == 1.0 and hu == 0.0:
            return NoOpTransform()
        return PhotometricTransform(b, c, s, hu, self.rgb)


# --------------------------------------------------------------------------- reading
def read_class_png(path, what: str, error: type[ValueError] = ValueError) -> np.ndarray:
    """Read a single-channel PNG of class ids (a label or a prediction) as ``(H, W)`` uint8.

    A file that cannot be decoded, or is not single-channel, raises ``error`` naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise error(
                    f"{path}: {what}s must be single-channel class ids, got PIL mode {im.mode}"
                )
            return np.array(im, dtype=np.uint8)
    except (OSError, SyntaxError) as e:
        raise error(f"{path}: cannot read {what} ({e})") from e


def read_label(path: str, image_path: str, image_hw: tuple[int, int], num_classes: int | None):
    """Read a prepared label PNG as ``(H, W)`` uint8 and validate it against its image."""
    label = read_class_png(path, "label")
    if label.shape != tuple(image_hw):
        raise ValueError(
            f"label {path} is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
            f"{image_path} is {image_hw[1]}x{image_hw[0]}"
        )
    if num_classes is not None:
        bad = (label >= num_classes) & (label != IGNORE_LABEL)
        if bad.any():
            vals = np.unique(label[bad]).tolist()
            raise ValueError(
                f"{path}: label values {vals[:10]} outside 0..{num_classes - 1} and "
                f"{IGNORE_LABEL} (ignore); was it prepared with datasets/prepare_*.py?"
            )
    return label


def read_image_bands(path: str, bands, image_format: str = "RGB") -> np.ndarray:
    """An image as (H, W, C) with one channel per name in ``bands``.

    TIFFs are read with all their bands (uint8 kept, other types as float32); other formats
    are read as RGB. A band count other than ``len(bands)`` raises ``ValueError``.
    """
    if str(path).lower().endswith(TIFF_SUFFIXES):
        image = read_tiff_bands(path)
    else:
        image = utils.read_image(path, format=image_format)  # (H, W, 3) uint8 RGB
    if image.shape[2] != len(bands):
        raise ValueError(
            f"{path}: {image.shape[2]} bands, but INPUT.BANDS names {len(bands)} ({list(bands)})"
        )
    return image


def class_masks(sem_seg: np.ndarray, ignore_label: int = IGNORE_LABEL):
    """Per-class masks of a label map: ``(T,)`` int64 sorted class ids, ``(T, H, W)`` bool."""
    classes = np.unique(sem_seg)
    classes = classes[classes != ignore_label].astype(np.int64)
    masks = sem_seg[None, :, :] == classes[:, None, None]
    return torch.from_numpy(classes), torch.from_numpy(masks)


def pad_to_divisible(image: np.ndarray, sem_seg: np.ndarray | None, div: int, ignore: int):
    """Pad bottom/right to a multiple of ``div``: image with 0, label with ``ignore``."""
    h, w = image.shape[:2]
    ph, pw = (-h) % div, (-w) % div
    if ph == 0 and pw == 0:
        return image, sem_seg
    image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=0)
    if sem_seg is not None:
        sem_seg = np.pad(sem_seg, ((0, ph), (0, pw)), constant_values=ignore)
    return image, sem_seg


# --------------------------------------------------------------------------- mapper
class AerialSemanticDatasetMapper:
    """Reads an aerial image and its train-id label, augments (training) and builds the class
    masks used by the criterion and by ground-truth text guidance."""

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: list,
        image_format: str = "RGB",
        ignore_label: int = IGNORE_LABEL,
        num_classes: int | None = None,
        size_divisibility: int = -1,
        bands=("red", "green", "blue"),
    ):
        if image_format != "RGB":
            raise ValueError(
                f"INPUT.FORMAT is {image_format!r}; SegCLIP's CLIP backbone takes RGB images: "
                "set INPUT.FORMAT: RGB"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.bands = check_band_names(bands, "INPUT.BANDS")
        mode = "training" if is_train else "inference"
        logger.info(f"[{type(self).__name__}] {mode} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: str | None = None):
        names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        dataset_name = dataset_name or (names[0] if len(names) else None)
        num_classes, ignore_label = None, IGNORE_LABEL
        if dataset_name:
            meta = MetadataCatalog.get(dataset_name)
            num_classes = len(meta.stuff_classes)
            ignore_label = meta.get("ignore_label", IGNORE_LABEL)
        augs = []
        if is_train:
            lo, hi = cfg.INPUT.RESIZE_SCALE
            augs.append(RandomScaleResize(float(lo), float(hi)))
            if cfg.INPUT.CROP.ENABLED:
                if cfg.INPUT.CROP.TYPE != "absolute":
                    raise ValueError(
                        f"INPUT.CROP.TYPE {cfg.INPUT.CROP.TYPE!r} is not supported by the "
                        "aerial_semantic mapper; use 'absolute' with INPUT.CROP.SIZE in pixels"
                    )
                ch, cw = (int(v) for v in cfg.INPUT.CROP.SIZE)
                augs.append(PadToMinSize(ch, cw, 0, ignore_label))
                augs.append(
                    RandomCropCategoryLimit(
                        ch, cw, cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore_label
                    )
                )
            augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
            if cfg.INPUT.RANDOM_VFLIP:
                augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
            if cfg.INPUT.RANDOM_ROTATE90:
                augs.append(RandomRotate90())
            if cfg.INPUT.COLOR_AUG:
                augs.append(RandomPhotometric(rgb=rgb_indices(cfg.INPUT.BANDS)))
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "num_classes": num_classes,
            "size_divisibility": cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY if is_train else -1,
            "bands": list(cfg.INPUT.BANDS),
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        image = read_image_bands(file_name, self.bands, self.image_format)  # (H, W, C)
        h0, w0 = image.shape[:2]
        sem_seg = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg = read_label(
                dataset_dict.pop("sem_seg_file_name"), file_name, (h0, w0), self.num_classes
            )
        elif self.is_train:
            raise ValueError(f"{file_name}: training needs a label ('sem_seg_file_name')")

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg
        if self.size_divisibility > 0:
            image, sem_seg = pad_to_divisible(
                image, sem_seg, self.size_divisibility, self.ignore_label
            )

        dataset_dict["height"], dataset_dict["width"] = h0, w0
        dataset_dict["image"] = torch.from_numpy(
            np.ascontiguousarray(image.transpose(2, 0, 1))
        )  # (C, H, W) uint8 or float32
        if sem_seg is not None:
            sem_seg = np.ascontiguousarray(sem_seg)
            dataset_dict["sem_seg"] = torch.from_numpy(sem_seg.astype(np.int64))  # (H, W)
            if self.is_train:
                classes, masks = class_masks(sem_seg, self.ignore_label)
                dataset_dict["gt_classes"] = classes  # (T,)
                dataset_dict["gt_masks"] = masks  # (T, H, W)
        return dataset_dict


@MAPPER_REGISTRY.register()
def aerial_semantic(cfg, is_train: bool = True, dataset_name: str | None = None):
    """Registry entry ``"aerial_semantic"``: an :class:`AerialSemanticDatasetMapper`."""
    return AerialSemanticDatasetMapper(cfg, is_train=is_train, dataset_name=dataset_name)


def build_train_mapper(cfg):
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    return MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, is_train=True)


def build_test_mapper(cfg, dataset_name: str | None = None):
    """The inference mapper (no augmentation, original size; ``sem_seg`` when labelled)."""
    return MAPPER_REGISTRY.get(cfg.INPUT.DATASET_MAPPER_NAME)(
        cfg, is_train=False, dataset_name=dataset_name
    )
