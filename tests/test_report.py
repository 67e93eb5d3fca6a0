"""Training UX: the log line (ETA, it/s), curves.png and the prediction panel."""

import logging

import numpy as np
from detectron2.utils.events import EventStorage

from segclip_d2.data.dataset_facts import get_facts
from segclip_d2.engine.report import TrainingLogPrinter, compose_panel, plot_curves


def _storage(iters=40, seconds=0.5):
    storage = EventStorage(0)
    for i in range(iters):
        storage.iter = i
        storage.put_scalar("time", seconds)
        storage.put_scalar("lr", 1e-3)
        storage.put_scalars(total_loss=10.0 - i * 0.1, loss_ce=2.0, loss_mask=3.0, loss_dice=1.0)
        if i in (19, 39):
            storage.put_scalar("sem_seg/mIoU", 30.0 + i)
    return storage


def test_log_line_shows_eta_and_iterations_per_second(caplog):
    storage = _storage()
    with storage, caplog.at_level(logging.INFO, logger="segclip_d2.train"):
        TrainingLogPrinter(max_iter=100).write()
    line = caplog.records[-1].getMessage()
    # 60 iterations left at 0.5 s each
    assert "iter 40/100" in line and "eta 0:00:30" in line and "2.00 it/s" in line
    assert "total_loss" in line and "lr 1.00e-03" in line


def test_curves_png_has_losses_and_miou(tmp_path):
    path = tmp_path / "curves.png"
    assert plot_curves(_storage(), str(path))
    import cv2

    img = cv2.imread(str(path))
    assert img is not None and img.shape[1] > img.shape[0] > 200


def test_panel_is_image_ground_truth_prediction_with_legend():
    facts = get_facts("loveda")
    h, w = 40, 50
    image = np.full((h, w, 3), 77, np.uint8)
    gt = np.zeros((h, w), np.uint8)
    gt[:, 25:] = 255  # ignore: black
    pred = np.full((h, w), 2, np.uint8)
    panel = compose_panel(image, gt, pred, facts)
    assert panel.shape[1] == 3 * w + 2 * 6
    assert panel.shape[0] > h + 28  # titles above, legend below
    row = 28 + h // 2
    assert (panel[row, 10] == 77).all()  # image
    assert tuple(panel[row, w + 6 + 5]) == tuple(facts.colors[0])  # ground truth, class 0
    assert (panel[row, w + 6 + 40] == 0).all()  # ignored pixels are black
    assert tuple(panel[row, 2 * (w + 6) + 5]) == tuple(facts.colors[2])  # prediction
    legend = panel[28 + h :]
    for color in facts.colors:  # every class has a swatch
        assert (legend.reshape(-1, 3) == np.array(color, np.uint8)).all(1).any(), color
    unlabelled = compose_panel(image, None, pred, facts)
    assert unlabelled.shape == panel.shape
