"""Tests for gpu_check.sh: its test size on the CPU runs every step and reports each, and a failing step is
reported and counted without stopping the others (what makes one call on a rare GPU tell the whole story)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["device and versions", "data", "smoke: stage geo", "smoke: stage psfm", "smoke: stage vlm", "bench (eager)",
         "CUDA-only tests"]


def run(tmp_path, python, *args):
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", os.path.join(REPO, "gpu_check.sh"), "--size=test", f"--out={tmp_path / 'out'}", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_every_step_runs_and_reports(tmp_path):
    result = run(tmp_path, sys.executable)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ok = [line for line in result.stdout.splitlines() if line.startswith("== ") and ": ok in " in line]
    assert len(ok) == len(STEPS) and all(line.startswith(f"== {step}") for line, step in zip(ok, STEPS)), ok
    assert "no CUDA device" in result.stdout or "x " in result.stdout  # the device line
    for stage in ("geo", "psfm", "vlm"):  # a checkpoint per stage, and the bench table's row
        assert os.path.exists(tmp_path / "out" / stage / "model.safetensors")
        assert f"| {stage} | tiny |" in result.stdout
    assert result.stdout.rstrip().endswith(f"0 step(s) failed; output in {tmp_path / 'out'}")


def test_a_failing_step_is_counted_and_the_rest_still_run(tmp_path):
    result = run(tmp_path, "false")  # an interpreter that fails every step
    assert result.returncode == len(STEPS)
    assert result.stdout.count("FAILED (exit 1)") == len(STEPS)
    (tmp_path / "out" / "earlier.txt").write_text("a call's output")  # an --out that holds something: refused
    again = run(tmp_path, sys.executable)
    assert again.returncode == 2 and "is not empty" in again.stderr and os.listdir(tmp_path / "out") == ["earlier.txt"]
