"""datasets/prepare_*.py under the error contract (one table row per case), shareable file
modes, and the cleanup of temps left by killed runs."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from script_helpers import assert_one_error_line, load_script, write_loveda_val

from segclip_d2.utils.atomic import temp_name

REPO = Path(__file__).resolve().parents[1]


SCRIPTS = {
    n: load_script(f"datasets/prepare_{n}.py") for n in ("loveda", "isaid", "uavid", "synthetic")
}


def _loveda_src(root: Path, truncate: bool = False) -> Path:
    write_loveda_val(root, {"Urban": "urban1", "Rural": "rural1"}, np.random.default_rng(0))
    if truncate:
        p = root / "Val" / "Urban" / "images_png" / "urban1.png"
        p.write_bytes(p.read_bytes()[:60])
    return root


def _file(t: Path) -> Path:
    (t / "taken").write_text("x")
    return t / "taken"


# (id, script, argv given tmp, texts the one-line message must contain)
CASES = [
    ("loveda-no-src-arg", "loveda", lambda t: ["--dst", str(t / "d")], ["command line", "--src"]),
    (
        "loveda-missing-src",
        "loveda",
        lambda t: ["--src", str(t / "nope"), "--dst", str(t / "d")],
        ["nope", "LoveDA source folder not found"],
    ),
    (
        "loveda-dst-is-a-file",
        "loveda",
        lambda t: ["--src", str(_loveda_src(t / "raw")), "--dst", str(_file(t))],
        ["--dst", "not a folder"],
    ),
    (
        "loveda-truncated-png",
        "loveda",
        lambda t: ["--src", str(_loveda_src(t / "raw", truncate=True)), "--dst", str(t / "d")],
        ["urban1.png", "truncated"],
    ),
    (
        "isaid-missing-src",
        "isaid",
        lambda t: ["--src", str(t / "nope"), "--dst", str(t / "d")],
        ["nope", "iSAID source folder not found"],
    ),
    (
        "isaid-bad-patch",
        "isaid",
        lambda t: ["--src", str(t), "--dst", str(t / "d"), "--patch-size", "0"],
        ["--patch-size"],
    ),
    (
        "uavid-missing-src",
        "uavid",
        lambda t: ["--src", str(t / "nope"), "--dst", str(t / "d")],
        ["nope", "UAVid source folder not found"],
    ),
    ("synthetic-bad-arg", "synthetic", lambda t: ["--dst"], ["command line", "--dst"]),
    (
        "synthetic-dst-is-a-file",
        "synthetic",
        lambda t: ["--dst", str(_file(t))],
        ["--dst", "not a folder"],
    ),
]


@pytest.mark.parametrize("case,script,argv,texts", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_exit_2(tmp_path, capsys, case, script, argv, texts):
    # what `python datasets/prepare_<name>.py ARGS` runs (main raises, the script reports)
    mod = SCRIPTS[script]
    runner = getattr(mod, "run_cli", None)
    rc = runner(mod.main, argv(tmp_path)) if runner else mod.main(argv(tmp_path))
    assert rc == 2
    err = capsys.readouterr().err
    assert_one_error_line(err, texts)
    split = tmp_path / "d" / "loveda" / "val"
    assert not (split / "manifest.json").exists(), "an interrupted split never looks complete"


def test_prepared_files_follow_the_umask_and_dead_temps_are_cleaned(tmp_path):
    src = _loveda_src(tmp_path / "raw")
    dst = tmp_path / "d"
    old = os.umask(0o022)
    try:
        assert SCRIPTS["loveda"].main(["--src", str(src), "--dst", str(dst)]) == 0
    finally:
        os.umask(old)
    split = dst / "loveda" / "val"
    files = [p for p in split.rglob("*") if p.is_file()]
    assert split / "manifest.json" in files and len(files) >= 5
    assert {p.stat().st_mode & 0o777 for p in files} == {0o644}
    # a killed run's temp (its writer is gone) is removed by the rerun; a live writer's stays
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    temps = {}
    for name, proc in (("live", live), ("dead", dead)):
        tmp = temp_name(split / "images" / f"{name}.png")
        tmp = tmp.with_name(tmp.name.replace(f"-{os.getpid()}-", f"-{proc.pid}-"))
        tmp.write_bytes(b"partial")
        temps[name] = tmp
    try:
        assert SCRIPTS["loveda"].main(["--src", str(src), "--dst", str(dst)]) == 0
        assert temps["live"].exists() and not temps["dead"].exists()
    finally:
        live.kill()
        live.wait()


def test_download_never_deletes_or_replaces_the_users_folders(tmp_path):
    """An archive holding Val/ next to Train/ adds Train/ and only the Val/ files the user lacks:
    the user's Val/ keeps every file, byte for byte (it was deleted before)."""
    import hashlib
    import zipfile

    tree = _loveda_src(tmp_path / "tree")  # Val/ of the archive
    (tree / "Val").rename(tree / "Train")
    _loveda_src(tree)
    (tree / "Val" / "archive_only.txt").write_text("from the archive")
    server = tmp_path / "server"
    server.mkdir()
    with zipfile.ZipFile(server / "Train.zip", "w") as zf:
        for p in sorted(q for q in tree.rglob("*") if q.is_file()):
            zf.write(p, p.relative_to(tree).as_posix())
    md5 = hashlib.md5((server / "Train.zip").read_bytes()).hexdigest()
    src = _loveda_src(tmp_path / "raw")  # the user's own Val/
    (src / "Val" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in (src / "Val").rglob("*") if p.is_file()}
    argv = ["--src", str(src), "--dst", str(tmp_path / "d"), "--splits", "train", "--download"]
    argv += ["--download-url", server.as_uri(), "--expected-md5", f"Train.zip={md5}"]
    assert SCRIPTS["loveda"].main(argv) == 0
    assert {p: p.read_bytes() for p in before} == before
    assert (src / "Val" / "archive_only.txt").is_file()  # added: the user had none
    assert (src / "Train" / "Urban" / "images_png" / "urban1.png").is_file()
    assert not [p for p in src.iterdir() if p.name.startswith(".")]  # no extraction leftovers


def test_overwrite_through_a_symlinked_split_keeps_the_link_and_its_neighbours(tmp_path):
    """--overwrite on a split folder that is a symbolic link (kept on another disk) rebuilds
    the split in the link's target; the link and the files next to the target stay."""
    src = _loveda_src(tmp_path / "raw")
    dst = tmp_path / "d"
    disk = tmp_path / "other_disk"
    (disk / "val").mkdir(parents=True)
    (disk / "keep.txt").write_text("not the split's")
    (dst / "loveda").mkdir(parents=True)
    (dst / "loveda" / "val").symlink_to(disk / "val", target_is_directory=True)
    argv = ["--src", str(src), "--dst", str(dst), "--splits", "val"]
    assert SCRIPTS["loveda"].main(argv) == 0
    (disk / "val" / "images" / "stale.png").write_bytes(b"old")
    assert SCRIPTS["loveda"].main(argv + ["--overwrite"]) == 0
    assert (dst / "loveda" / "val").is_symlink()
    assert (disk / "val" / "manifest.json").is_file()
    assert not (disk / "val" / "images" / "stale.png").exists()
    assert (disk / "keep.txt").read_text() == "not the split's"
