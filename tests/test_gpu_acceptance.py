"""tools/gpu_acceptance.sh without a GPU: argument handling, the no-GPU exit, the checks table
and its exit status, the parts of the checks that run on a CPU (config loading, the DDP
comparison, the inference check on a small model), and (slow, needs PyPI) the wheel download
and the offline install."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import gpu_acceptance  # noqa: E402
import gpu_checks  # noqa: E402

SCRIPT = REPO / "tools" / "gpu_acceptance.sh"


def _sh(*args, python=sys.executable, timeout=120):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python, "HOME": str(Path.home())}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--download-wheels", "w"], "needs --python-version"),
        (["--download-wheels", "w", "--python-version", "312"], "expected 3.X"),
        (["--python-version", "3.12"], "only applies to --download-wheels"),
        (["--download-wheels", "w", "--python-version", "3.12", "--wheels", "."], "separate"),
        (["--wheels", "/nonexistent/wheels"], "no such folder"),
        (["--checks", "op,fly"], "unknown fly"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_acceptance.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_no_gpu_exits_at_once_with_a_message():
    proc = _sh()
    assert proc.returncode == gpu_acceptance.NO_GPU_EXIT
    assert "no CUDA GPU visible" in proc.stderr and "nothing was run" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    missing = _sh(python="/nonexistent/python3")
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_table_lists_every_check_and_counts_failures():
    rows = [
        {"check": "op CUDA fp32 fwd", "result": "PASS", "measured": "3e-07", "target": "<= 1e-4"},
        {"check": "fp16 AMP 100 it", "result": "FAIL", "measured": "12.1 -> 13.0", "target": "x"},
    ]
    table = gpu_checks.format_table(rows)
    lines = table.splitlines()
    assert "tolerance / target" in lines[1]
    assert any("FAIL" in line and "12.1 -> 13.0" in line for line in lines)
    assert len({len(line) for line in lines[:-1]}) == 1, "columns are aligned"
    assert lines[-1] == "2 checks: 1 failed"


def test_a_failed_or_crashing_check_makes_the_exit_status_1(monkeypatch, capsys):
    monkeypatch.setattr(gpu_checks, "check_op", lambda: [gpu_checks._row("op", True, 1, 1)])
    assert gpu_checks.run_checks(["op"]) == 0

    def crash():
        raise RuntimeError("CUDA error: no kernel image")

    monkeypatch.setattr(gpu_checks, "check_op", crash)
    assert gpu_checks.run_checks(["op"]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: CUDA error: no kernel image" in out and "1 failed" in out


def test_checks_cli_refuses_an_unknown_check(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_checks.main(["--checks", "op,fly"])
    assert exc.value.code == 2 and "unknown fly" in capsys.readouterr().err


def test_check_configs_load_through_the_project_loader():
    cfg = gpu_checks._cfg("configs/synthetic/segclip_cpu.yaml", gpu_checks.OFFLINE)
    assert cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == ""
    assert cfg.MODEL.RESNETS.DEPTH == 18  # from the YAML file, over its _BASE_


def test_ddp_comparison_is_the_relative_difference_of_the_updates():
    import torch

    init = {"w": torch.zeros(4), "n": torch.tensor(3)}  # integer buffers are not compared
    one = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0]), "n": torch.tensor(9)}
    two = {"w": torch.tensor([1.0, 0.5, 0.0, 0.0]), "n": torch.tensor(0)}
    assert gpu_checks.update_rel_diff(init, one, two) == pytest.approx(0.5)
    assert gpu_checks.update_rel_diff(init, one, one) == 0.0


def test_inference_check_runs_and_reports_on_cpu():
    """The inference check on a small model on the CPU: one row per mode, size and precision,
    each naming the latency and how many probabilities were not finite."""
    rows = gpu_checks.check_inference(
        device="cpu", config="configs/synthetic/segclip_cpu.yaml", sizes=(64,),
        precisions=("fp32",),
    )  # fmt: skip
    assert [r["check"] for r in rows] == ["inference whole 64 fp32", "inference slide 64 fp32"]
    for r in rows:
        assert r["result"] == "PASS", r
        assert "ms" in r["measured"] and f"0 of {7 * 64 * 64} not finite" in r["measured"]


@pytest.mark.slow
@pytest.mark.network
def test_download_for_py312_then_offline_install_into_a_fresh_folder(tmp_path):
    """A subset: a cp312 binary wheel, pure wheels and an sdist-only package built into a wheel;
    then the pure ones install offline (no index) into an empty folder and import from there."""
    wheels = tmp_path / "wheels"
    pkgs = "iopath,portalocker,tqdm,typing_extensions,pyyaml"
    proc = _sh("--download-wheels", str(wheels), "--python-version", "3.12", "--packages", pkgs,
               timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("iopath-") and n.endswith("-py3-none-any.whl") for n in names), names
    assert any(n.startswith(("PyYAML-", "pyyaml-")) and "cp312" in n for n in names), names
    assert "MB in 5 files" in (wheels / "MANIFEST.txt").read_text()

    target = tmp_path / "fresh"
    proc = _sh("--wheels", str(wheels), "--install-target", str(target),
               "--packages", "iopath", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = "import iopath, portalocker; print(iopath.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(str(target))


@pytest.mark.slow
def test_fp16_train_net_check_runs_and_passes_on_cpu(tmp_path):
    """The GPU check's own code path, on the CPU (fp16 autocast + GradScaler there too): the
    command line it runs is right, and its rows pass and say what they measured."""
    rows = gpu_checks.check_fp16_train_net(tmp_path, device="cpu")
    assert [r["result"] for r in rows] == ["PASS", "PASS"], rows
    assert "6 iterations logged" in rows[1]["measured"]
