"""Command-line flags shared by train_net.py (evaluation) and demo/demo.py."""


def add_inference_arguments(parser) -> None:
    """``--tta`` and ``--precision``, the command-line form of ``TEST.TTA.ENABLED`` and
    ``TEST.PRECISION`` (train_net.py's evaluation and demo/demo.py)."""
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (sets TEST.TTA.ENABLED True; views from TEST.TTA.*)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default=None,
        help="inference precision (sets TEST.PRECISION, default auto: bf16 where the CPU or GPU "
        "computes it natively, fp16 on older GPUs, else fp32); fp16 on a CPU runs bf16",
    )
    parser.add_argument(
        "--allow-text-mismatch",
        action="store_true",
        help="use a CLIP text encoder that does not reproduce the checkpoint's stored class "
        "embeddings (sets MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH True)",
    )


def apply_inference_arguments(cfg, args) -> None:
    """Write the flags of :func:`add_inference_arguments` into ``cfg`` (not frozen yet)."""
    if getattr(args, "tta", False):
        cfg.TEST.TTA.ENABLED = True
    if getattr(args, "precision", None):
        cfg.TEST.PRECISION = args.precision
    if getattr(args, "allow_text_mismatch", False):
        cfg.MODEL.SEGCLIP.TEXT.ALLOW_MISMATCH = True
