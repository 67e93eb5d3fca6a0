"""SegCLIP's config namespace. Every key carries a one-line comment and is read by some code
(``tests/test_config.py`` checks both)."""

from detectron2.config import CfgNode as CN

# The paper's prompt; "{}" is replaced by the cleaned class name.
PROMPT_TEMPLATE = "a photo with a {}"


def add_segclip_config(cfg):
    """Add SegCLIP's keys to a detectron2 config (in place)."""
    # ------------------------------------------------------------------ model
    cfg.MODEL.SEGCLIP = CN()
    # Registered transformer decoder: "SegCLIPTransformerDecoder" (text queries, CFF, GTG) or
    # "Mask2FormerTransformerDecoder" (learnable queries: the "no text queries" baseline).
    cfg.MODEL.SEGCLIP.TRANSFORMER_DECODER_NAME = "SegCLIPTransformerDecoder"
    # Number of text queries N (K class slots + N-K blank slots).
    cfg.MODEL.SEGCLIP.NUM_QUERIES = 100
    # Transformer decoder width C.
    cfg.MODEL.SEGCLIP.HIDDEN_DIM = 256
    # Attention heads in the decoder and the CFF module.
    cfg.MODEL.SEGCLIP.NHEADS = 8
    # Hidden size of the decoder's feed-forward layers.
    cfg.MODEL.SEGCLIP.DIM_FEEDFORWARD = 2048
    # Number of masked-attention decoder layers (the real count, not "layers + 1").
    cfg.MODEL.SEGCLIP.DEC_LAYERS = 9
    # Dropout in the decoder and CFF.
    cfg.MODEL.SEGCLIP.DROPOUT = 0.0
    # Pre-norm (True) or post-norm (False) decoder layers.
    cfg.MODEL.SEGCLIP.PRE_NORM = False
    # Channels of the per-query mask embeddings and of the mask features.
    cfg.MODEL.SEGCLIP.MASK_DIM = 256
    # Pad images to a multiple of this (training: the mapper, labels with ignore; evaluation: the
    # inferencer; -1 or 1: no padding).
    cfg.MODEL.SEGCLIP.SIZE_DIVISIBILITY = 32
    # Deformable attention implementation: "auto" (compiled op when built), "cpp" or "pytorch".
    cfg.MODEL.SEGCLIP.MSDA_IMPL = "auto"
    # Class head: "linear" (N x (K+1) linear layer) or "text" (similarity to class text embeddings).
    cfg.MODEL.SEGCLIP.CLASS_HEAD = "linear"
    # Use the CFF (cross-modal feature fusion) module before the decoder (False for ablation).
    cfg.MODEL.SEGCLIP.CFF_ENABLED = True
    # Class-mask combination resolution at inference: "low" (mask features, then upsample K
    # channels) or "full" (upsample the N mask logits first; slow, kept for comparison).
    cfg.MODEL.SEGCLIP.POSTPROCESS = "low"

    # Text side (TMP).
    cfg.MODEL.SEGCLIP.TEXT = CN()
    # open_clip model name of the frozen text encoder.
    cfg.MODEL.SEGCLIP.TEXT.MODEL_NAME = "RN50"
    # open_clip pretrained tag ("openai"), a local checkpoint path, or "" for random init.
    cfg.MODEL.SEGCLIP.TEXT.PRETRAINED = "openai"
    # Fail (True) instead of warning and falling back to random init when the weights are missing.
    cfg.MODEL.SEGCLIP.TEXT.REQUIRE_PRETRAINED = False
    # Prompt template; "{}" is replaced by the cleaned class name.
    cfg.MODEL.SEGCLIP.TEXT.PROMPT_TEMPLATE = PROMPT_TEMPLATE
    # Use a loaded text encoder that does not reproduce a checkpoint's stored embeddings (warn).
    cfg.MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH = False

    # Ground-truth text guidance (GTG), training only.
    cfg.MODEL.SEGCLIP.GT_GUIDANCE = CN()
    # Add guidance queries from the ground-truth classes during training.
    cfg.MODEL.SEGCLIP.GT_GUIDANCE.ENABLED = True
    # Multiplier of the guidance group's losses.
    cfg.MODEL.SEGCLIP.GT_GUIDANCE.LOSS_WEIGHT = 1.0

    # Losses and matching (Mask2Former's defaults).
    cfg.MODEL.SEGCLIP.LOSS = CN()
    # Weight of the classification loss (and of its matching cost).
    cfg.MODEL.SEGCLIP.LOSS.CLASS_WEIGHT = 2.0
    # Weight of the mask BCE loss (and of its matching cost).
    cfg.MODEL.SEGCLIP.LOSS.MASK_WEIGHT = 5.0
    # Weight of the mask dice loss (and of its matching cost).
    cfg.MODEL.SEGCLIP.LOSS.DICE_WEIGHT = 5.0
    # Classification weight of the "no object" class.
    cfg.MODEL.SEGCLIP.LOSS.NO_OBJECT_WEIGHT = 0.1
    # Losses on every decoder layer's and on the CFF prediction.
    cfg.MODEL.SEGCLIP.LOSS.DEEP_SUPERVISION = True
    # Points sampled per mask for matching and mask losses.
    cfg.MODEL.SEGCLIP.LOSS.TRAIN_NUM_POINTS = 12544
    # Oversampling factor of importance sampling.
    cfg.MODEL.SEGCLIP.LOSS.OVERSAMPLE_RATIO = 3.0
    # Fraction of points taken where the prediction is most uncertain.
    cfg.MODEL.SEGCLIP.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75

    # Pixel decoder.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER = CN()
    # Registered pixel decoder name.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.NAME = "MSDeformAttnPixelDecoder"
    # Backbone features the pixel decoder reads.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # Features refined by the deformable-attention encoder.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.DEFORM_ATTN_IN_FEATURES = ["res3", "res4", "res5"]
    # Deformable-attention encoder layers.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.ENC_LAYERS = 6
    # Channels of the pixel decoder.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.CONVS_DIM = 256
    # Normalisation of the pixel decoder's convolutions.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.NORM = "GN"
    # Stride of the mask features.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.COMMON_STRIDE = 4
    # Sampling points per head and level in the deformable attention.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.N_POINTS = 4
    # Hidden size of the encoder's feed-forward layers.
    cfg.MODEL.SEGCLIP.PIXEL_DECODER.DIM_FEEDFORWARD = 1024

    # CLIP ResNet backbone (open_clip image tower).
    cfg.MODEL.CLIP_RESNET = CN()
    # open_clip model name of the image tower.
    cfg.MODEL.CLIP_RESNET.MODEL_NAME = "RN50"
    # open_clip pretrained tag, local checkpoint path, or "" for random init.
    cfg.MODEL.CLIP_RESNET.PRETRAINED = "openai"
    # Stages frozen from the stem (0 = nothing, 1 = stem, 2 = stem + res2, ...).
    cfg.MODEL.CLIP_RESNET.FREEZE_AT = 0
    # Outputs of the backbone.
    cfg.MODEL.CLIP_RESNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Normalisation: "FrozenBN" (fixed affine), "BN" (trainable) or "SyncBN" (multi-GPU only).
    cfg.MODEL.CLIP_RESNET.NORM = "FrozenBN"
    # Fail (True) instead of warning and using random init when the image weights are missing.
    cfg.MODEL.CLIP_RESNET.REQUIRE_PRETRAINED = False

    # ------------------------------------------------------------------ input / data
    # Registered dataset mapper used for training (see segclip_d2.data.mapper).
    cfg.INPUT.DATASET_MAPPER_NAME = "aerial_semantic"
    # Random resize range as a fraction of the image's size (scale sampled uniformly).
    cfg.INPUT.RESIZE_SCALE = (0.5, 2.0)
    # Largest fraction of a crop one class may cover before the crop is redrawn.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Random vertical flip.
    cfg.INPUT.RANDOM_VFLIP = True
    # Random 90-degree rotations.
    cfg.INPUT.RANDOM_ROTATE90 = True
    # Photometric jitter (brightness, contrast, saturation, hue).
    cfg.INPUT.COLOR_AUG = True
    # Ground sample distance of the training imagery, metres per pixel (0: unknown).
    cfg.INPUT.GSD_M = 0.0
    # Names of the input bands in file order (MODEL.PIXEL_MEAN/STD give one value per band);
    # "red", "green", "blue" take the pretrained RGB kernels of the CLIP backbone's stem.
    cfg.INPUT.BANDS = ["red", "green", "blue"]
    # Dataset prepared by datasets/prepare_custom.py: when set, DATASETS.TRAIN/TEST become
    # NAME_train/NAME_val and INPUT.BANDS, MODEL.PIXEL_MEAN/STD, INPUT.GSD_M its dataset.yaml's.
    cfg.DATASETS.CUSTOM = ""

    # ------------------------------------------------------------------ solver
    # Optimizer: "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the backbone.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Weight decay of embeddings (query, context and positional embeddings).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Power of the poly learning-rate schedule.
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # Metric that decides the best checkpoint (model_best.pth); "" disables the hook.
    cfg.SOLVER.BEST_CHECKPOINT_METRIC = "sem_seg/mIoU"
    # AMP autocast dtype when SOLVER.AMP.ENABLED: "auto" (fp16 on CUDA, bf16 on CPUs with native
    # bf16, else fp32), "float16" (with a GradScaler, also on CPU) or "bfloat16".
    cfg.SOLVER.AMP.DTYPE = "auto"

    # ------------------------------------------------------------------ test
    # Inference mode: "whole" image or "slide" window.
    cfg.TEST.MODE = "whole"
    cfg.TEST.SLIDE = CN()
    # Sliding-window crop size (H, W).
    cfg.TEST.SLIDE.CROP_SIZE = (512, 512)
    # Sliding-window stride (H, W).
    cfg.TEST.SLIDE.STRIDE = (341, 341)
    # Windows run through the model at once.
    cfg.TEST.SLIDE.BATCH_SIZE = 4
    # How overlapping windows are combined: "cosine" or "linear" taper towards the window edges,
    # or "flat" (plain mean).
    cfg.TEST.SLIDE.BLEND = "cosine"
    cfg.TEST.TTA = CN()
    # Enable test-time augmentation.
    cfg.TEST.TTA.ENABLED = False
    # Flips to add: any of "h", "v".
    cfg.TEST.TTA.FLIPS = ["h", "v"]
    # Extra 90-degree rotations (multiples of 90, in degrees).
    cfg.TEST.TTA.ROTATIONS = [90, 180, 270]
    # Extra scales (1.0 is always included).
    cfg.TEST.TTA.SCALES = [1.0]
    # Inference precision: "auto" (bf16 where native, fp16 on older GPUs, else fp32), "fp32",
    # "bf16" or "fp16".
    cfg.TEST.PRECISION = "auto"
    # Only write predictions in the benchmark's submission format (no metrics).
    cfg.TEST.FORMAT_ONLY = False

    # ------------------------------------------------------------------ removed keys
    # Keys of earlier versions that configs saved by training runs (OUTPUT_DIR/config.yaml, model
    # cards) still hold: ignored with a warning, so those files load.
    for key in REMOVED_KEYS:
        if not cfg.key_is_deprecated(key):
            cfg.register_deprecated_key(key)
    return cfg


# Removed key -> what replaced it (for the reader; merging ignores them).
REMOVED_KEYS = {
    # training mapper padding; now MODEL.SEGCLIP.SIZE_DIVISIBILITY, also the model's padding
    "INPUT.SIZE_DIVISIBILITY": "MODEL.SEGCLIP.SIZE_DIVISIBILITY",
}
