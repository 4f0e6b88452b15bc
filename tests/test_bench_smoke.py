"""The bench scripts run (tiny, CPU, one step) so they cannot rot between GPU sessions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokencompose.families.flux import supported as flux_supported

BENCH = Path(__file__).resolve().parents[1] / "bench"
NEEDS_FLUX = pytest.mark.skipif(not flux_supported(), reason="the flux family needs diffusers >= 0.31")


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


@pytest.mark.parametrize(
    ("arch", "extra"),
    [("sd3", []), pytest.param("flux", ["--grad-ckpt", "--ckpt-only", "--blocks", "5,1"], marks=NEEDS_FLUX)],
)
def test_train_step_bench_joint_tiny(arch, extra, tmp_path):
    """--arch sd3 / flux: the family's conditioning and predict, LoRA on the supervised blocks' attention
    projections, (b) rows per normalisation; Flux also at reduced depth under checkpointing."""
    import json

    out = tmp_path / "rows.json"
    args = [sys.executable, str(BENCH / "train_step.py"), "--tiny", "--arch", arch, "--lora", "4"]
    args += ["--normalize", "text", "joint", "--chunk", "8", "--json", str(out), *extra]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"paper design: skipped for {arch}" in proc.stdout
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(r["mode"], r["normalize"]) for r in rows] == [("plain", ""), ("ours", "text"), ("ours", "joint")]
    assert all(not r["error"] and r["sps"] > 0 and r["lora"] == 4 for r in rows), rows
    supervised = {"sd3": 1, "flux": 4}[arch]  # transformer_blocks.9 / transformer_blocks.15-18
    assert [r["captured_layers"] for r in rows] == [0, supervised, supervised]
    assert {"sd3": "8 modules)", "flux": "32 modules)"}[arch] in record["header"]  # 8 projections a block
    ours = {c["mode"]: c for c in record["capture"]}["ours"]
    assert ours["tokens"] == {"sd3": 77 + 256, "flux": 512}[arch] and ours["chunk"] == 8 and ours["chunk_mib"] > 0
    if arch == "flux":
        assert all(r["ckpt"] and r["depth"].startswith("REDUCED DEPTH") for r in rows)
        assert "real: 0, 15, 16, 17, 18" in record["header"] and "1 of 2 single-stream" in record["header"]


@pytest.mark.parametrize("arch", ["sd3", pytest.param("flux", marks=NEEDS_FLUX)])
def test_joint_capture_costs_match_a_forward(arch):
    """The SD3 / Flux capture table's layer sizes (H, N image tokens, L text tokens) are those of the maps a
    forward through the family's predict records, in every text-attention block, odd token grids included."""
    import torch

    sys.path.insert(0, str(BENCH))
    from train_step import FAMILIES, AttentionCapture, build_unet, get_family, joint_layers, make_batch

    family = get_family(FAMILIES[arch])
    for px in (64, 48):
        model = build_unet(arch, True, torch.device("cpu"), px)
        x, t, _, cond, *_ = make_batch(model, 1, "cpu", px=px)
        with AttentionCapture(model, ["joint", "single"], normalize="text") as cap, torch.no_grad():
            family.predict(model, x, t, cond)
            shapes = {name: tuple(m.shape[1:]) for name, m in cap.maps.items()}
        assert {name: (h, n, text) for name, h, n, text in joint_layers(model, px)} == shapes


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


def test_base_card_script_tiny(tmp_path):
    """bench/base_card.py (the shapes base card's failure numbers) runs end to end on a tiny random model."""
    import json

    out = tmp_path / "card"
    proc = subprocess.run([sys.executable, str(BENCH / "base_card.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "issue #20's criteria" in proc.stdout and "| 4 | 1 |" in proc.stdout
    card = json.loads((out / "card.json").read_text())
    assert set(card["objects"]["by_k"]) == {"1", "2", "3", "4"} and card["grounding"]["num_pairs"] > 0
    assert card["attention_sizes"][0] == 8  # the tiny UNet's latent side


def test_demo_replicates_script_tiny(tmp_path):
    """bench/demo_replicates.py (the verdict over seeds) runs two tiny demos and pools their differences."""
    import json

    from tokencompose.models import tiny_components

    tiny_components(seed=0).save(tmp_path / "base")
    (tmp_path / "base" / "recipe.json").write_text(json.dumps({"world": "nouns"}))
    sizes = ["train_images=8", "steps=1", "batch_size=4", "prompts=3", "images_per_prompt=1", "sample_steps=1",
             "grounding_images=2", "exact_prompts=0", f"base={tmp_path / 'base'}"]  # fmt: skip
    out = tmp_path / "rep"
    proc = subprocess.run([sys.executable, str(BENCH / "demo_replicates.py"), "--seeds", "3,4", "--out", str(out),
                           *sizes], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "replicates.json").read_text())
    assert report["seeds"] == [3, 4] and report["pooled"]["runs"] == 2 and report["pooled_base"]["runs"] == 2
    diffs = [r["diff"]["diff"] for r in report["runs"]]
    assert report["pooled"]["diff"] == pytest.approx([(a + b) / 2 for a, b in zip(*diffs, strict=True)])
    assert "TokenCompose - base, pooled over seeds" in proc.stdout
