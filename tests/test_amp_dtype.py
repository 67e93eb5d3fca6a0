"""SOLVER.AMP.DTYPE and --precision auto: one "native bf16?" decision, both outcomes."""

import logging
import sys
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

from segclip_d2 import add_segclip_config
from segclip_d2.engine.trainer import amp_dtype_for
from segclip_d2.errors import UserError
from segclip_d2.predict import precision as prec
from segclip_d2.utils import hardware

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_net.py: the repo root


@pytest.fixture
def native(monkeypatch):
    """Set the CPU's native-bf16 answer through the documented override."""

    def set_native(value: bool):
        monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "1" if value else "0")
        prec._logged.clear()

    return set_native


def _cfg(dtype="auto", enabled=True):
    cfg = add_segclip_config(get_cfg())
    cfg.SOLVER.AMP.ENABLED = enabled
    cfg.SOLVER.AMP.DTYPE = dtype
    return cfg


def test_cpuinfo_flags_decide_without_override(monkeypatch, tmp_path):
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)
    info = tmp_path / "cpuinfo"
    read = hardware._cpuinfo_flags
    monkeypatch.setattr(hardware, "_cpuinfo_flags", lambda: read(str(info)))
    monkeypatch.setattr(hardware.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    try:
        for flags, expected in (("fpu avx2 avx512_bf16", True), ("fpu avx2 amx_bf16", True)):
            info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
            hardware._detect_native_bf16.cache_clear()
            assert hardware.cpu_has_native_bf16() is expected, flags
        info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")  # AMD Zen 3
        hardware._detect_native_bf16.cache_clear()
        native, why = hardware.native_bf16_reason()
        assert not native and "no avx512_bf16/amx_bf16" in why
    finally:
        hardware._detect_native_bf16.cache_clear()


def test_bad_override_is_an_error(monkeypatch):
    monkeypatch.setenv(hardware.NATIVE_BF16_ENV, "yes")
    with pytest.raises(ValueError, match="SEGCLIP_CPU_NATIVE_BF16"):
        hardware.cpu_has_native_bf16()


def test_auto_on_cpu_follows_native_bf16(native, caplog):
    native(True)
    assert amp_dtype_for(_cfg(), "cpu") == torch.bfloat16
    native(False)
    caplog.clear()  # the bf16 line above is logged too when an earlier test set INFO up
    with caplog.at_level(logging.INFO, logger="segclip_d2.engine.trainer"):
        assert amp_dtype_for(_cfg(), "cpu") is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fp32" in lines[0] and "no native bf16" in lines[0]


def test_auto_on_cuda_is_fp16_and_disabled_is_fp32(native):
    native(False)
    assert amp_dtype_for(_cfg(), "cuda") == torch.float16
    assert amp_dtype_for(_cfg(enabled=False), "cpu") is None
    assert amp_dtype_for(_cfg("bfloat16"), "cuda") == torch.bfloat16


def test_explicit_bf16_on_emulating_cpu_warns_with_slowdown(native, caplog):
    native(False)
    with caplog.at_level(logging.WARNING, logger="segclip_d2.engine.trainer"):
        assert amp_dtype_for(_cfg("bfloat16"), "cpu") == torch.bfloat16
    assert f"{hardware.EMULATED_BF16_SLOWDOWN}x slower" in caplog.text
    caplog.clear()
    native(True)
    with caplog.at_level(logging.WARNING, logger="segclip_d2.engine.trainer"):
        assert amp_dtype_for(_cfg("bfloat16"), "cpu") == torch.bfloat16
    assert not caplog.records


def test_float16_on_cpu_trains_with_a_grad_scaler(native):
    from segclip_d2.engine.train_loop import SegCLIPTrainLoop

    native(False)
    dtype = amp_dtype_for(_cfg("float16"), "cpu")
    assert dtype == torch.float16
    model = torch.nn.Linear(2, 2)
    loop = SegCLIPTrainLoop(model, [], torch.optim.SGD(model.parameters(), lr=0.1), amp_dtype=dtype)
    assert loop.grad_scaler is not None and loop.grad_scaler._device == "cpu"


def test_unknown_dtype_is_a_user_error():
    with pytest.raises(UserError, match="SOLVER.AMP.DTYPE"):
        amp_dtype_for(_cfg("fp8"), "cpu")


def test_inference_auto_uses_the_same_decision(native, caplog):
    native(True)
    assert prec.effective_precision("auto", "cpu") == "bf16"
    native(False)
    assert prec.effective_precision("auto", "cpu") == "fp32"
    with caplog.at_level(logging.WARNING, logger="segclip_d2.predict.precision"):
        assert prec.effective_precision("bf16", "cpu") == "bf16"
    assert "slower than fp32" in caplog.text
    assert prec.effective_precision("fp32", "cpu") == "fp32"


def test_precision_auto_is_the_default_for_evaluation_and_demo():
    import argparse

    from segclip_d2.cli import add_inference_arguments

    assert add_segclip_config(get_cfg()).TEST.PRECISION == "auto"
    parser = argparse.ArgumentParser()
    add_inference_arguments(parser)
    assert parser.parse_args(["--precision", "auto"]).precision == "auto"


def test_float16_amp_trains_six_iterations_through_train_net(tiny_training, native):
    """SOLVER.AMP.DTYPE float16 (what auto picks on a V100 / T4) through train_net.py and the
    real train loop: CPU fp16 autocast with a GradScaler, 6 iterations, finite weights; the last
    log line counts 6/6 (not 7/6 with a negative ETA)."""
    import json

    import train_net
    from segclip_d2.errors import run_main

    native(False)
    argv, out = tiny_training
    argv = argv + ["SOLVER.MAX_ITER", "6", "SOLVER.AMP.ENABLED", "True"]
    assert run_main(train_net.cli, argv + ["SOLVER.AMP.DTYPE", "float16"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(r["iteration"] for r in rows) == 5
    assert "amp_skipped_steps" in rows[-1]  # the scaler's skipped steps are logged
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert "grad_scaler" in final["trainer"]["_trainer"]
    weights = [v for v in final["model"].values() if v.is_floating_point()]
    assert all(bool(torch.isfinite(v).all()) for v in weights)
    log = [ln for ln in (out / "log.txt").read_text().splitlines() if " iter " in ln]
    assert "iter 6/6" in log[-1] and "-1 day" not in log[-1], log[-1]
