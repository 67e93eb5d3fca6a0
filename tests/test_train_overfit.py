"""Overfitting one 256x256 crop of a real LoveDA tile: the model must be able to memorise it."""

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from test_train import tiny_cfg  # tests/ is on sys.path (rootdir import mode)

from segclip_d2.data.dataset_facts import get_facts
from segclip_d2.data.mapper import class_masks
from segclip_d2.engine.optimizer import build_optimizer


@pytest.mark.slow
def test_overfit_real_loveda_crop(shared_data, tmp_path):
    image_path = shared_data / "loveda" / "images" / "1.png"
    label_path = shared_data / "loveda" / "masks" / "1.png"
    if not image_path.is_file() or not label_path.is_file():
        pytest.skip(f"LoveDA sample not found at {image_path}")
    facts = get_facts("loveda")
    image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)[:, :, ::-1]  # RGB
    label = facts.raw_to_train_ids(cv2.imread(str(label_path), cv2.IMREAD_UNCHANGED))
    y0, x0, s = 512, 128, 256  # 4 classes, the largest covers about a third of the crop
    image = np.ascontiguousarray(image[y0 : y0 + s, x0 : x0 + s].transpose(2, 0, 1))
    label = label[y0 : y0 + s, x0 : x0 + s]
    valid = label != facts.ignore_label
    majority = np.bincount(label[valid], minlength=facts.num_classes).max() / valid.sum()
    assert majority < 0.5, "the crop should not be dominated by one class"
    classes, masks = class_masks(label)
    sample = {
        "image": torch.from_numpy(image),
        "sem_seg": torch.from_numpy(label.astype(np.int64)),
        "gt_classes": classes,
        "gt_masks": masks,
        "height": s,
        "width": s,
        "file_name": str(image_path),
    }
    cfg = tiny_cfg(tmp_path, "DATASETS.TRAIN", "('loveda_train',)", "SOLVER.BASE_LR", "0.002")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_all_rng(0)
        model = build_model(cfg)
        optimizer = build_optimizer(cfg, model)
        model.train()
        for _ in range(60):
            loss = sum(model([sample]).values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        model.eval()
        with torch.no_grad():
            pred = model([sample])[0]["sem_seg"].argmax(0).numpy()
    finally:
        torch.set_num_threads(threads)
    accuracy = (pred[valid] == label[valid]).mean()
    assert accuracy > 0.9, f"pixel accuracy {accuracy:.3f} after 60 steps (majority {majority:.2f})"
