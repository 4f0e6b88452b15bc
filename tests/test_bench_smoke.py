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


def test_train_step_bench_sdxl_tiny(tmp_path):
    """--arch sdxl: added conditioning, LoRA adapters through peft, the family's layers, under checkpointing."""
    import json

    out = tmp_path / "rows.json"
    args = [sys.executable, str(BENCH / "train_step.py"), "--tiny", "--arch", "sdxl", "--lora", "4"]
    args += ["--grad-ckpt", "--ckpt-only", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "paper design: skipped for sdxl" in proc.stdout
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [r["mode"] for r in rows] == ["plain", "ours"]
    assert all(not r["error"] and r["sps"] > 0 and r["lora"] == 4 and r["ckpt"] for r in rows), rows
    capture = {c["mode"]: c for c in record["capture"]}
    assert capture["plain"]["layers"] == rows[0]["captured_layers"] == 0
    assert capture["ours"]["layers"] == rows[1]["captured_layers"] > 0  # mid + up of the tiny SDXL UNet
    assert 0 < capture["ours"]["mib_columns"] < capture["ours"]["mib"]


@pytest.mark.parametrize("arch", ["sd14", "sdxl"])
def test_capture_costs_match_a_forward(arch):
    """The capture table's layer sizes (computed from the UNet's structure) are the maps a forward produces,
    odd latent sizes included."""
    import torch

    sys.path.insert(0, str(BENCH))
    from train_step import StoreEverything, attention_layers, build_unet, make_batch

    for px in (64, 40):
        unet = build_unet(arch, True, torch.device("cpu"), px)
        store: dict = {}
        unet.set_attn_processor({k: StoreEverything(k.removesuffix(".processor"), store) for k in unet.attn_processors})
        x, t, ctx, added, *_ = make_batch(unet, 1, "cpu")
        with torch.no_grad():
            unet(x, t, ctx, added_cond_kwargs=added)
        assert {name: (h, n) for name, _, h, n in attention_layers(unet, px)} == {
            name: tuple(p.shape[:2]) for name, p in store.items()
        }


def test_generation_bench_tiny(tmp_path):
    out = tmp_path / "gen.json"
    args = [sys.executable, str(BENCH / "generation.py"), "--tiny", "--device", "cpu", "--prompts", "1"]
    args += ["--images-per-prompt", "2", "--steps", "2", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    row = json.loads(out.read_text())
    assert row["images"] == 2 and row["paper_loop_images_per_s"] > 0 and row["ours_images_per_s"] > 0
