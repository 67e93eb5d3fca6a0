"""RemoteSensingSemSegEvaluator, build_evaluator and tools/evaluate_predictions.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils import comm
from PIL import Image
from script_helpers import load_script, write_loveda_val

from segclip_d2.config import add_segclip_config
from segclip_d2.data import evaluator as ev_mod
from segclip_d2.data.dataset_facts import LOVEDA_CLASSES
from segclip_d2.data.evaluator import RemoteSensingSemSegEvaluator, build_evaluator

REPO = Path(__file__).resolve().parents[1]
K = 7


def _reference(gts, preds, k=K, ignore=255):
    """Independent per-class computation (loops over classes, no confusion matrix)."""
    tp = np.zeros(k)
    fp = np.zeros(k)
    fn = np.zeros(k)
    for gt, pred in zip(gts, preds):
        valid = gt != ignore
        for c in range(k):
            g, p = (gt == c) & valid, (pred == c) & valid
            tp[c] += np.sum(g & p)
            fp[c] += np.sum(~g & p)
            fn[c] += np.sum(g & ~p)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
    gtc = tp + fn
    oa = tp.sum() / gtc.sum()
    fw = np.sum((gtc / gtc.sum())[gtc > 0] * iou[gtc > 0])
    return 100 * iou, 100 * f1, 100 * np.nanmean(iou), 100 * np.nanmean(f1), 100 * oa, 100 * fw


def _perturb(gt, rng, frac=0.3):
    pred = np.where(gt == 255, 0, gt).astype(np.int64)
    flip = rng.random(gt.shape) < frac
    pred[flip] = rng.integers(0, K, flip.sum())
    pred[:100, :100] = 3  # a block of systematic error
    return pred


def _one_hot(pred):
    return torch.nn.functional.one_hot(torch.from_numpy(pred), K).permute(2, 0, 1).float()


def test_metrics_match_numpy_on_real_masks(shared_data, tmp_path):
    rng = np.random.default_rng(0)
    gts, preds = [], []
    ev = RemoteSensingSemSegEvaluator(
        "synthetic_aerial_val", distributed=False, output_dir=str(tmp_path)
    )
    ev.reset()
    for i in (0, 1):
        raw = np.asarray(Image.open(shared_data / "loveda" / "masks" / f"{i}.png"))
        gt = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        gt[:50] = 255  # some ignored pixels
        pred = _perturb(gt, rng)
        gts.append(gt)
        preds.append(pred)
        ev.process(
            [{"sem_seg": torch.from_numpy(gt), "file_name": f"{i}.png"}],
            [{"sem_seg": _one_hot(pred)}],
        )
    res = ev.evaluate()["sem_seg"]
    iou, f1, miou, mf1, oa, fw = _reference(gts, preds)
    for c, name in enumerate(LOVEDA_CLASSES):
        if math.isnan(iou[c]):
            assert math.isnan(res[f"IoU-{name}"])
        else:
            assert res[f"IoU-{name}"] == pytest.approx(iou[c], abs=1e-9)
            assert res[f"F1-{name}"] == pytest.approx(f1[c], abs=1e-9)
    assert res["mIoU"] == pytest.approx(miou) and res["mF1"] == pytest.approx(mf1)
    assert res["OA"] == pytest.approx(oa) and res["fwIoU"] == pytest.approx(fw)
    # barren (class 4) is absent from the real masks; predictions hit it through the noise,
    # so it counts with IoU 0 rather than NaN
    assert res["IoU-barren"] == 0.0
    data = json.loads((tmp_path / "sem_seg_metrics.json").read_text())
    assert data["mIoU"] == pytest.approx(miou, abs=1e-3)
    assert set(data["IoU"]) == set(LOVEDA_CLASSES) and data["unit"] == "percent"
    conf = np.load(tmp_path / "confusion_matrix.npy")
    valid = sum(int((g != 255).sum()) for g in gts)
    assert conf.shape == (K, K) and conf.sum() == valid
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_absent_class_is_nan_and_left_out_of_the_mean():
    ev = RemoteSensingSemSegEvaluator("synthetic_aerial_val", distributed=False)
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 1, 0], [0, 0, 1, 6]])  # 255 pixel predicted 6: ignored
    ev.add(gt, pred)
    res = ev.evaluate()["sem_seg"]
    assert res["IoU-background"] == pytest.approx(100 * 4 / 5)
    assert res["IoU-building"] == pytest.approx(100 * 2 / 3)
    for name in LOVEDA_CLASSES[2:]:
        assert math.isnan(res[f"IoU-{name}"])
    assert res["mIoU"] == pytest.approx(100 * (4 / 5 + 2 / 3) / 2)
    assert res["OA"] == pytest.approx(100 * 6 / 7)
    with pytest.raises(ValueError, match=r"x\.png: prediction is 3x1"):
        ev.add(gt, np.zeros((1, 3), np.int64), "x.png")


def test_distributed_sums_every_process(monkeypatch):
    a = RemoteSensingSemSegEvaluator("synthetic_aerial_val", distributed=True)
    b = RemoteSensingSemSegEvaluator("synthetic_aerial_val", distributed=True)
    a.add(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64))
    b.add(np.ones((2, 2), np.int64), np.zeros((2, 2), np.int64))
    monkeypatch.setattr(comm, "all_gather", lambda data: [data, (b.confusion, b.missed, 1)])
    res = a.evaluate()["sem_seg"]
    assert res["OA"] == pytest.approx(50.0)
    assert res["IoU-building"] == 0.0 and res["IoU-background"] == pytest.approx(50.0)
    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert a.evaluate() is None


def test_build_evaluator_uses_metadata(tmp_path):
    cfg = add_segclip_config(get_cfg())
    ev = build_evaluator(cfg, "isaid_val", str(tmp_path))
    assert isinstance(ev, RemoteSensingSemSegEvaluator) and ev.num_classes == 16
    cfg.TEST.FORMAT_ONLY = True
    with pytest.raises(ValueError, match="isaid_val.*no submission formatter"):
        build_evaluator(cfg, "isaid_val", str(tmp_path))
    assert isinstance(
        build_evaluator(cfg, "loveda_val", str(tmp_path)), ev_mod.SemSegFormatOnlyEvaluator
    )


def test_evaluate_predictions_tool(tmp_path, monkeypatch, capsys):
    prep = load_script("datasets/prepare_loveda.py")
    rng = np.random.default_rng(3)
    src = tmp_path / "raw"
    raws = write_loveda_val(src, {"Urban": "3514", "Rural": "2522"}, rng, shape=(24, 20))
    assert prep.main(["--src", str(src), "--dst", str(tmp_path / "ds")]) == 0
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "ds"))
    preds, gts = tmp_path / "preds", []
    preds.mkdir()
    pred_list = []
    for domain, name in (("Urban", "3514"), ("Rural", "2522")):
        raw = raws[(domain, "masks_png")]
        gt = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
        pred = _perturb(gt, rng, 0.4)[:24, :20].astype(np.uint8)
        Image.fromarray(pred).save(preds / f"{domain.lower()}_{name}.png")
        gts.append(gt)
        pred_list.append(pred)
    tool = load_script("tools/evaluate_predictions.py")
    out = tmp_path / "metrics.json"
    assert (
        tool.main(["--dataset", "loveda_val", "--pred-dir", str(preds), "--output", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    iou, _, miou, mf1, oa, fw = _reference(gts, pred_list)
    assert data["mIoU"] == pytest.approx(miou, abs=1e-3)
    assert data["mF1"] == pytest.approx(mf1, abs=1e-3)
    assert data["OA"] == pytest.approx(oa, abs=1e-3)
    assert data["fwIoU"] == pytest.approx(fw, abs=1e-3)
    assert data["IoU"]["building"] == pytest.approx(iou[1], abs=1e-3)
    # wrong size and missing file name the prediction
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(preds / "rural_2522.png")
    assert tool.main(["--dataset", "loveda_val", "--pred-dir", str(preds)]) == 2
    assert "rural_2522.png: prediction is 5x5" in capsys.readouterr().err
    (preds / "rural_2522.png").unlink()
    assert tool.main(["--dataset", "loveda_val", "--pred-dir", str(preds)]) == 2
    assert "rural_2522.png: prediction file is missing" in capsys.readouterr().err
