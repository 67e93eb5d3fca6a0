"""Atomic outputs: pid-tagged temps, umask-honouring modes, cleanup of dead writers' temps."""

import os
import subprocess
import time

import pytest

from segclip_d2.utils.atomic import (
    AtomicFile,
    atomic_output,
    parse_temp_name,
    remove_stale_temps,
    temp_name,
)


def test_temp_name_carries_pid_and_suffix(tmp_path):
    tmp = temp_name(tmp_path / "tile_pred.tif")
    assert tmp.parent == tmp_path and tmp.name.startswith(".tile_pred.tif.tmp-")
    assert tmp.suffix == ".tif"
    final, _, pid = parse_temp_name(tmp.name)
    assert (final, pid) == ("tile_pred.tif", os.getpid())


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_output_mode_follows_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode


def test_failure_leaves_old_file_and_no_temp(tmp_path):
    (tmp_path / "a.txt").write_text("old")
    with pytest.raises(KeyError), atomic_output(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise KeyError("boom")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    f = AtomicFile(tmp_path / "b.txt")
    f.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def _temp_of(final, pid):
    """The temp name process ``pid`` on this host would use for ``final``."""
    name = temp_name(final).name.replace(f"-{os.getpid()}-", f"-{pid}-")
    path = final.with_name(name)
    path.write_text("partial")
    return path


def test_only_dead_writers_temps_are_removed(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live_tmp = _temp_of(tmp_path / "live.png", live.pid)
        dead_tmp = _temp_of(tmp_path / "dead.png", dead.pid)
        mine = AtomicFile(tmp_path / "mine.png")
        (tmp_path / ".other.tmp").write_text("not ours")  # foreign name: never touched
        assert remove_stale_temps(tmp_path) == [dead_tmp]
        assert live_tmp.exists() and mine.tmp.exists() and (tmp_path / ".other.tmp").exists()
    finally:
        live.kill()
        live.wait()
    assert remove_stale_temps(tmp_path) == [live_tmp]


def test_reused_pid_does_not_keep_a_temp(tmp_path):
    """A pid alive now but started after the temp was last written is not its writer."""
    live = subprocess.Popen(["sleep", "60"])
    try:
        tmp = _temp_of(tmp_path / "x.png", live.pid)
        old = time.time() - 3600
        os.utime(tmp, (old, old))
        assert remove_stale_temps(tmp_path) == [tmp]
    finally:
        live.kill()
        live.wait()
