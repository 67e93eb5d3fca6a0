"""Atomic checkpoints and a --resume that survives a checkpoint truncated at any point."""

import logging
import os

import pytest
import torch
from torch import nn

from segclip_d2.checkpoint.checkpointer import CorruptCheckpointError, SegCLIPCheckpointer


class Counter:
    """A checkpointable like the trainer: its state says which save it came from."""

    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def _checkpointer(folder, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    counter = Counter()
    return SegCLIPCheckpointer(model, str(folder), trainer=counter), model, counter


def _save_two(folder):
    ck, model, counter = _checkpointer(folder)
    for step in (1, 2):
        counter.step = step
        with torch.no_grad():
            model[0].weight.fill_(step)
        ck.save(f"model_{step:07d}", iteration=step)
    return folder / "model_0000002.pth"


def test_save_is_atomic_and_tags_after_the_rename(tmp_path, monkeypatch):
    path = _save_two(tmp_path)
    assert (tmp_path / "last_checkpoint").read_text() == path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000002.pth",
    ], "no temp file may remain"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    # A save that dies half-way (here: torch.save raising after writing some bytes) leaves the
    # previous checkpoint and the tag untouched, and no file under the new name.
    ck, _, _ = _checkpointer(tmp_path)

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save("model_0000003", iteration=3)
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == path.name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("keep", [0, 1, 100, 0.25, 0.5, 0.9, -1])
def test_resume_falls_back_past_a_truncated_checkpoint(tmp_path, caplog, keep):
    newest = _save_two(tmp_path)
    data = newest.read_bytes()
    n = keep if isinstance(keep, int) and keep >= 0 else int(len(data) * keep) if keep > 0 else -1
    newest.write_bytes(data[:n])
    os.utime(tmp_path / "model_0000001.pth")  # fallback order must not rely on mtimes only
    ck, model, counter = _checkpointer(tmp_path, seed=1)
    with caplog.at_level(logging.WARNING):
        extra = ck.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and counter.step == 1
    assert torch.all(model[0].weight == 1)
    text = caplog.text
    assert f"skipping {newest}" in text and "truncated or corrupt" in text
    assert "resumed from" in text and "model_0000001.pth" in text


def test_resume_with_no_intact_checkpoint_is_one_clear_error(tmp_path):
    for p in (_save_two(tmp_path), tmp_path / "model_0000001.pth"):
        p.write_bytes(p.read_bytes()[:50])
    ck, _, _ = _checkpointer(tmp_path)
    with pytest.raises(CorruptCheckpointError) as info:
        ck.resume_or_load("", resume=True)
    line = info.value.line()
    assert "last_checkpoint" in line and "model_0000002.pth" in line
    assert "model_0000001.pth" in line and "without --resume" in line


def test_loading_a_corrupt_file_names_it(tmp_path):
    bad = tmp_path / "model_final.pth"
    bad.write_bytes(b"not a checkpoint at all")
    ck, _, _ = _checkpointer(tmp_path)
    with pytest.raises(CorruptCheckpointError) as info:
        ck.load(str(bad))
    assert info.value.where == str(bad) and "truncated or corrupt" in info.value.what
    assert "weights_only" not in info.value.line()


def test_first_save_removes_a_killed_saves_temp(tmp_path):
    import subprocess

    from segclip_d2.utils.atomic import temp_name

    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp = temp_name(tmp_path / "model_0000150.pth")
    tmp = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    tmp.write_bytes(b"PK half a checkpoint")
    ck, _, _ = _checkpointer(tmp_path)
    ck.save("model_0000150", iteration=150)
    assert not tmp.exists() and (tmp_path / "model_0000150.pth").is_file()
