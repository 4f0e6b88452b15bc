"""``tokencompose probe layers``: outputs, per-layer numbers equal to ``evaluate_grounding`` on that layer, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tokencompose.cli import main
from tokencompose.probe.layers import short_name, unet_order

ARGS = ["--shapes", "4", "--resolution", "64", "--timesteps", "100,700", "--batch-size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def probe_out(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe")
    assert main(["probe", "layers", "--model", str(model_dir), "--out", str(out), *ARGS]) == 0
    return out


def test_probe_writes_table_json_figure_manifest(probe_out: Path) -> None:
    result = json.loads((probe_out / "probe.json").read_text())
    assert result["kind"] == "probe" and result["buckets"] == ["100", "700"] and result["num_images"] == 4
    names = [r["name"] for r in result["layers"]]
    assert len(names) == 16 and names == unet_order(names)  # every cross-attention layer, down -> mid -> up
    assert [r["block"] for r in result["layers"]].index("mid") == 6
    assert result["layers"][0]["resolution"] == [8, 8] and result["layers"][6]["resolution"] == [1, 1]
    for r in result["layers"]:
        assert set(r["cells"]) == {"100", "700", "mean"}
        assert all(0 <= c["miou"] <= 1 and 0 <= c["auroc"] <= 1 for c in r["cells"].values())
    table = (probe_out / "probe.md").read_text()
    assert table.count("| `") == 16 and "mIoU t=100" in table and "AUROC mean" in table and "8×8" in table
    assert (probe_out / "probe_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((probe_out / "figures.json").read_text())
    assert manifest[0]["kind"] == "probe" and manifest[0]["settings"]["timesteps"] == [100, 700]
    assert json.loads((probe_out / "settings.json").read_text())["shapes"] == 4


def test_probe_numbers_equal_evaluate_grounding_on_each_layer(probe_out: Path, model_dir: Path) -> None:
    """The probe reuses the grounding metric: each row is ``evaluate_grounding`` restricted to that layer."""
    import tempfile

    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader

    from tokencompose.attention import AttentionCapture
    from tokencompose.data.dataset import collate
    from tokencompose.evaluation.grounding import evaluate_grounding
    from tokencompose.evaluation.run import grounding_dataset
    from tokencompose.loading import ModelSettings, load_model
    from tokencompose.probe import ProbeSettings

    result = json.loads((probe_out / "probe.json").read_text())
    s = ProbeSettings(model=ModelSettings(model=str(model_dir), device="cpu"), shapes=4, resolution=64)
    comps = load_model(s.model)
    sched = DDPMScheduler.from_config(comps.scheduler.config)
    with tempfile.TemporaryDirectory() as tmp:
        ds, _, _, size = grounding_dataset(s, comps, tmp)
        loader = DataLoader(ds, batch_size=2, collate_fn=collate)
        # The probe captures every layer (explicit softmax); evaluate_grounding on one layer would run the
        # others fused (SDPA), the same attention up to float rounding, which the min-max normalisation of
        # near-flat maps of a random tiny UNet magnifies. An outer capture gives the reference the probe's
        # very forward, so the scores must be equal, not close.
        with AttentionCapture(comps.unet, layers=("down", "mid", "up")):
            refs = {row["name"]: evaluate_grounding(comps, sched, loader,
                                                    timesteps=(100, 700), layers=[row["name"]],
                                                    eval_size=(size, size), seed=0)
                    for row in result["layers"]}  # fmt: skip
    for row in result["layers"]:
        ref = refs[row["name"]]
        for b in ("100", "700"):
            assert row["scores"]["per_timestep"][b] == ref["per_timestep"][b], (row["name"], b)
            assert row["cells"][b] == {
                "miou": ref["per_timestep"][b]["best_miou"],
                "auroc": ref["per_timestep"][b]["auroc"],
            }
        assert row["scores"] == ref
        assert row["cells"]["mean"] == {"miou": ref["best_miou"], "auroc": ref["auroc"]}


def test_capture_by_size_of_named_layers(tiny) -> None:
    from tokencompose.attention import AttentionCapture

    unet = tiny.unet
    with AttentionCapture(unet, layers=("mid", "up")) as cap:
        unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, 32))
        name = "up_blocks.3.attentions.1.transformer_blocks.0.attn2"
        one = cap.by_size([name])
        assert list(one) == [(8, 8)] and len(one[(8, 8)]) == 1 and one[(8, 8)][0] is cap.maps[name]
        assert cap.size_of(name) == (8, 8)
        assert sum(len(v) for v in cap.by_size().values()) == len(cap.names)  # the default is unchanged
        with pytest.raises(KeyError, match="not captured"):
            cap.by_size(["down_blocks.0.attentions.0.transformer_blocks.0.attn2"])


def test_names() -> None:
    names = ["down_blocks.0.a", "up_blocks.1.a", "mid_block.a", "down_blocks.1.a"]
    assert unet_order(names) == ["down_blocks.0.a", "down_blocks.1.a", "mid_block.a", "up_blocks.1.a"]
    assert short_name("up_blocks.1.attentions.2.transformer_blocks.0.attn2") == "up1.a2.t0"


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--shapes", "2", "--layers", "nonsense"], "nonsense"),
        (["--shapes", "2", "--timesteps", "5000"], "outside"),
        (["--shapes", "2", "--timesteps", "lots"], "timesteps"),
        ([], "--data"),
        (["--data", "/no/such.jsonl"], "does not exist"),
    ],
)
def test_probe_user_mistake_is_one_line_exit_2(extra, words, model_dir: Path, tmp_path: Path, capsys) -> None:
    rc = main(["probe", "layers", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--device", "cpu", *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and words in err[0] and "Traceback" not in err[0], err


def test_report_shows_the_probe(probe_out: Path, tmp_path: Path) -> None:
    from tokencompose.visualize.report import build_report

    page = build_report([probe_out], tmp_path / "r.html").read_text()
    assert 'id="probe"' in page and "Layer probe" in page and "data:image/png;base64" in page
