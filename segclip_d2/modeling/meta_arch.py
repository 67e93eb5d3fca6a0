"""SegCLIP meta-architecture: backbone -> pixel decoder -> text-prompted transformer decoder.

Training: mapper dicts (interface D) -> dict of weighted losses (the criterion's output).
Evaluation: one pass over each whole image (:meth:`SegCLIP.predict_sem_seg_probs`), resized to the
original ``height``/``width``: ``[{"sem_seg": (K, height, width)}]``. Sliding windows and
test-time augmentation wrap the model from outside (:mod:`segclip_d2.predict`); the model does
not know how it is run.

Padding: images are padded bottom/right to ``SIZE_DIVISIBILITY`` with zeros after normalisation
(the pixel mean before it), and padded positions are treated as image content, as in
Mask2Former. No padding mask is given to the pixel decoder.
"""

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import ImageList
from torch import nn

from segclip_d2.checkpoint.pretrained import embed_dim_of

from .criterion import build_criterion
from .pixel_decoder import build_pixel_decoder
from .text_encoder import FrozenCLIPTextEncoder
from .transformer_decoder import MaskedAttentionDecoder, build_transformer_decoder

logger = logging.getLogger(__name__)

POSTPROCESS_MODES = ("low", "full")


@META_ARCH_REGISTRY.register()
class SegCLIP(nn.Module):
    """SegCLIP (mask classification with CLIP-text-conditioned queries, CFF and GTG).

    Args:
        backbone: detectron2 backbone with the pixel decoder's input features.
        pixel_decoder: (features) -> (mask_features, multi_scale_features).
        transformer_decoder: a transformer decoder from ``TRANSFORMER_DECODER_REGISTRY``
            (SegCLIP's by default, see :class:`~.transformer_decoder.SegCLIPTransformerDecoder`).
            Checkpoints written when it was called ``predictor`` load unchanged (their
            ``predictor.*`` keys are read as ``transformer_decoder.*``).
        criterion: (outputs, targets) -> dict of weighted losses.
        text_encoder: frozen CLIP text encoder, ``(class_names) -> (K, D)``, caching per
            vocabulary; None for a decoder that reads no text (the Mask2Former baseline with
            the linear class head).
        class_names: the vocabulary (K names, the training dataset's ``stuff_classes``).
        pixel_mean, pixel_std: RGB normalisation.
        size_divisibility: pad images to a multiple of this.
        class_head: "linear" or "text" (only "text" allows :meth:`set_vocabulary`).
        gt_guidance: add the GTG group in training (only for a decoder with text queries).
        postprocess: "low" (SEGCLIP.md: combine classes and masks at stride 4, then upsample the
            K class maps) or "full" (Mask2Former: upsample the N mask logits first).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: nn.Module,
        transformer_decoder: MaskedAttentionDecoder,
        criterion: nn.Module,
        text_encoder: nn.Module | None,
        class_names: Sequence[str],
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        class_head: str = "linear",
        gt_guidance: bool = True,
        postprocess: str = "low",
        input_bands: Sequence[str] = ("red", "green", "blue"),
    ):
        super().__init__()
        if postprocess not in POSTPROCESS_MODES:
            raise ValueError(
                f"MODEL.SEGCLIP.POSTPROCESS must be one of {POSTPROCESS_MODES}, got {postprocess!r}"
            )
        if len(class_names) == 0:
            raise ValueError("SegCLIP needs at least one class name")
        if gt_guidance and not transformer_decoder.supports_guidance:
            raise ValueError(
                f"{type(transformer_decoder).__name__} has no text queries, so ground-truth text "
                "guidance does not apply: set MODEL.SEGCLIP.GT_GUIDANCE.ENABLED False"
            )
        if text_encoder is None and transformer_decoder.needs_text:
            raise ValueError(f"{type(transformer_decoder).__name__} needs a text encoder")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.text_encoder = text_encoder
        self.class_names = list(class_names)
        # what the input channels are (INPUT.BANDS): loading RGB weights widens to them
        self.input_bands = tuple(str(b).lower() for b in input_bands)
        self.num_train_classes = len(self.class_names)
        self.size_divisibility = int(size_divisibility)
        self.class_head = class_head
        self.gt_guidance = gt_guidance
        self.postprocess = postprocess
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.pixel_mean.numel() != self.pixel_std.numel():
            raise ValueError(
                f"MODEL.PIXEL_MEAN has {self.pixel_mean.numel()} values and MODEL.PIXEL_STD "
                f"{self.pixel_std.numel()}: give one value per input band in each"
            )

    @classmethod
    def from_config(cls, cfg):
        if cfg.INPUT.FORMAT != "RGB":
            raise ValueError(
                f"SegCLIP takes RGB images (CLIP convention; the mapper emits RGB): set "
                f"INPUT.FORMAT to 'RGB' (got {cfg.INPUT.FORMAT!r}) and MODEL.PIXEL_MEAN/STD in "
                "RGB order"
            )
        if not len(cfg.MODEL.PIXEL_MEAN) == len(cfg.MODEL.PIXEL_STD) == len(cfg.INPUT.BANDS):
            raise ValueError(
                f"MODEL.PIXEL_MEAN/STD have {len(cfg.MODEL.PIXEL_MEAN)}/{len(cfg.MODEL.PIXEL_STD)} "
                f"values but INPUT.BANDS names {len(cfg.INPUT.BANDS)} input channels: give one "
                "value per band"
            )
        if len(cfg.DATASETS.TRAIN) == 0:
            raise ValueError("DATASETS.TRAIN is empty: SegCLIP takes its classes from it")
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        class_names = list(getattr(meta, "stuff_classes", None) or [])
        if not class_names:
            raise ValueError(
                f"dataset {cfg.DATASETS.TRAIN[0]!r} has no 'stuff_classes' metadata (is it "
                "registered? see segclip_d2.data.register)"
            )
        backbone = build_backbone(cfg)
        pixel_decoder = build_pixel_decoder(cfg, backbone.output_shape())
        transformer_decoder = build_transformer_decoder(
            cfg,
            in_channels=cfg.MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM,
            text_dim=embed_dim_of(cfg.MODEL.SEGCLIP.TEXT.MODEL_NAME),
            num_train_classes=len(class_names),
        )
        text_encoder = FrozenCLIPTextEncoder(cfg) if transformer_decoder.needs_text else None
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": build_criterion(cfg, len(class_names)),
            "text_encoder": text_encoder,
            "class_names": class_names,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "size_divisibility": cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY,
            "class_head": cfg.MODEL.SEGCLIP.CLASS_HEAD,
            "gt_guidance": cfg.MODEL.SEGCLIP.GT_GUIDANCE.ENABLED,
            "postprocess": cfg.MODEL.SEGCLIP.POSTPROCESS,
            "input_bands": list(cfg.INPUT.BANDS),
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the rename call the transformer decoder "predictor"
        old = prefix + "predictor."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "transformer_decoder." + key[len(old) :]] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def vocabulary_size(self) -> int:
        """K of the current vocabulary (``num_train_classes`` is K of the training one)."""
        return len(self.class_names)

    # ------------------------------------------------------------------ vocabulary
    def text_embeddings(self) -> torch.Tensor | None:
        """(K, D) frozen class text embeddings of the current vocabulary (cached by the
        encoder: computed once per vocabulary); None for a model without text encoder."""
        if self.text_encoder is None:
            return None
        emb = self.text_encoder(self.class_names)
        if emb.dim() != 2 or emb.shape[0] != self.vocabulary_size:
            raise RuntimeError(
                f"text encoder returned {tuple(emb.shape)} for {self.vocabulary_size} class names"
            )
        return emb

    def set_vocabulary(self, class_names: Sequence[str]) -> None:
        """Predict over ``class_names`` from now on (K may change). Needs the text class head."""
        if self.class_head != "text":
            raise ValueError(
                "set_vocabulary() needs MODEL.SEGCLIP.CLASS_HEAD 'text': this model uses the "
                f"{self.class_head!r} class head, whose classes are fixed to the training "
                f"vocabulary ({self.num_train_classes} classes)"
            )
        names = [str(n) for n in class_names]
        if not names:
            raise ValueError("set_vocabulary() needs at least one class name")
        self.transformer_decoder.check_vocabulary(len(names))
        self.class_names = names
        self.text_embeddings()  # encode once now; later calls hit the encoder's cache
        logger.info("SegCLIP vocabulary set to %d classes: %s", len(names), names)

    # ------------------------------------------------------------------ core
    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def _run(self, images: torch.Tensor, guidance: dict | None = None) -> dict:
        """(B, 3, H, W) normalised, padded images -> decoder outputs (interface C)."""
        features = self.backbone(images)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.transformer_decoder(
            multi_scale, mask_features, self.text_embeddings(), guidance
        )

    def predict_sem_seg_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores of a batch.

        Args:
            images: (B, 3, h, w) float RGB in 0..255, not normalised.
        Returns:
            (B, K, h, w): sum over queries of p(class) * sigmoid(mask).
        """
        if images.dim() != 4 or images.shape[1] != self.pixel_mean.numel():
            raise ValueError(
                f"predict_sem_seg_probs expects (B, {self.pixel_mean.numel()}, h, w) images (one "
                f"channel per input band), got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        x = self._normalize(images.to(self.device, self.pixel_mean.dtype))
        d = self.size_divisibility
        ph, pw = (-(-h // d) * d, -(-w // d) * d) if d > 1 else (h, w)
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
        out = self._run(x)
        # The softmax, sigmoid and class-mask combination run in fp32 even under bf16/fp16
        # autocast: they decide the argmax and are cheap next to the network.
        with torch.autocast(device_type=x.device.type, enabled=False):
            probs = self.semantic_inference(out["pred_logits"], out["pred_masks"], (ph, pw))
        return probs[:, :, :h, :w]

    def semantic_inference(
        self, pred_logits: torch.Tensor, pred_masks: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Class scores from the decoder's predictions (SEGCLIP.md, "Class prediction and
        semantic inference").

        Args:
            pred_logits: (B, N, K+1) class logits (last = no object).
            pred_masks: (B, N, h4, w4) mask logits at stride 4.
            size: (H, W) of the (padded) image.
        Returns:
            (B, K, H, W) float32: sum over queries of softmax(class)[:K] * sigmoid(mask);
            "low" combines at stride 4 and upsamples the K maps, "full" upsamples the N mask
            logits first.
        """
        cls = pred_logits.float().softmax(-1)[..., :-1]  # (B, N, K)
        masks = pred_masks.float()  # (B, N, h4, w4)
        if self.postprocess == "full":
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
            return torch.einsum("bqk,bqhw->bkhw", cls, masks.sigmoid())
        probs = torch.einsum("bqk,bqhw->bkhw", cls, masks.sigmoid())  # (B, K, h4, w4)
        return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)

    def forward(self, batched_inputs: list[dict]):
        """
        Args:
            batched_inputs: mapper dicts: "image" uint8 (3, H, W) RGB; in training also
                "gt_classes" (T,) int64 and "gt_masks" (T, H, W) bool; optional "height", "width"
                (the original size for the output).
        Returns:
            training: dict of weighted losses; evaluation: [{"sem_seg": (K, height, width)}].
        """
        if self.training:
            return self._forward_train(batched_inputs)
        results = []
        for x in batched_inputs:
            image = x["image"].to(self.device).float()  # (3, H, W)
            probs = self.predict_sem_seg_probs(image[None])  # (1, K, H, W)
            size = (int(x.get("height", image.shape[1])), int(x.get("width", image.shape[2])))
            if tuple(probs.shape[-2:]) != size:
                probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
            results.append({"sem_seg": probs[0]})
        return results

    def _forward_train(self, batched_inputs: list[dict]) -> dict[str, torch.Tensor]:
        if self.vocabulary_size != self.num_train_classes:
            raise RuntimeError(
                f"training with a vocabulary of {self.vocabulary_size} classes, but the criterion "
                f"was built for {self.num_train_classes}: set_vocabulary() is for inference only"
            )
        for i, x in enumerate(batched_inputs):
            if "gt_classes" not in x or "gt_masks" not in x:
                raise ValueError(
                    f"training input {i} ({x.get('file_name', '?')}) has no 'gt_classes'/"
                    "'gt_masks': use the training mapper (segclip_d2.data.mapper)"
                )
        images = [
            self._normalize(x["image"].to(self.device, self.pixel_mean.dtype))
            for x in batched_inputs
        ]
        images = ImageList.from_tensors(images, self.size_divisibility)
        targets = self._prepare_targets(batched_inputs, tuple(images.tensor.shape[-2:]))
        guidance = None
        if self.gt_guidance:
            guidance = {
                "classes": [t["labels"] for t in targets],
                "masks": [t["masks"] for t in targets],
            }
        outputs = self._run(images.tensor, guidance)
        return self.criterion(outputs, targets)

    def _prepare_targets(self, batched_inputs: list[dict], size: tuple[int, int]) -> list[dict]:
        """Mapper ground truth -> criterion targets with masks padded to ``size`` (H, W)."""
        targets = []
        for x in batched_inputs:
            labels = x["gt_classes"].to(self.device, torch.int64)  # (T,)
            masks = x["gt_masks"].to(self.device)  # (T, h, w)
            h, w = x["image"].shape[-2:]
            if masks.dim() != 3 or masks.shape[0] != labels.numel() or masks.shape[1:] != (h, w):
                raise ValueError(
                    f"{x.get('file_name', '?')}: gt_masks {tuple(masks.shape)} do not match "
                    f"{labels.numel()} gt_classes and the image size {(h, w)}"
                )
            if labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) >= self.vocabulary_size
            ):
                raise ValueError(
                    f"{x.get('file_name', '?')}: gt_classes {labels.tolist()} outside 0.."
                    f"{self.vocabulary_size - 1}"
                )
            padded = torch.zeros((masks.shape[0], *size), dtype=torch.bool, device=self.device)
            padded[:, :h, :w] = masks.bool()
            targets.append({"labels": labels, "masks": padded})
        return targets
