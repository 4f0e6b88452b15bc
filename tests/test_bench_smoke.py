"""The bench scripts run (tiny, CPU, one step) so they cannot rot between GPU sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_gpu_session_script_parses():
    """The one-command GPU session (bench/gpu_session.sh) is at least valid bash."""
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_session.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", ["losses.py", "train_step.py", "train_loop.py"])
def test_bench_script_tiny(script, tmp_path):
    args = [sys.executable, str(BENCH / script), "--tiny"]
    if script == "train_step.py":
        args += ["--grad-ckpt", "--json", str(tmp_path / "rows.json")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "device: cpu" in proc.stdout
    if script == "train_step.py":
        import json

        rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
        assert {r["mode"] for r in rows} == {"plain", "ours", "paper"}
        assert {r["ckpt"] for r in rows if r["mode"] == "ours"} == {False, True}
        assert all(not r["error"] and r["sps"] > 0 for r in rows), rows


def test_generation_bench_tiny(tmp_path):
    out = tmp_path / "gen.json"
    args = [sys.executable, str(BENCH / "generation.py"), "--tiny", "--device", "cpu", "--prompts", "1"]
    args += ["--images-per-prompt", "2", "--steps", "2", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    row = json.loads(out.read_text())
    assert row["images"] == 2 and row["paper_loop_images_per_s"] > 0 and row["ours_images_per_s"] > 0
