"""Latency: one-image sampling calls timed after warm-up; mean ± std with the settings that produced it."""

from __future__ import annotations

import json

import pytest

from tokencompose.errors import UserError
from tokencompose.evaluation.generation import GenerationSettings
from tokencompose.evaluation.latency import LatencySettings, latency_summary, run_latency, time_calls
from tokencompose.loading import ModelSettings


def test_summary_is_mean_and_sample_std():
    s = latency_summary([1.0, 2.0, 4.0])
    assert s["seconds_per_image"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) ** 0.5 / 2**0.5)
    assert (s["median"], s["min"], s["max"], s["repeats"]) == (2.0, 1.0, 4.0, 3)
    assert latency_summary([3.0])["std"] == 0.0


class CountingPipe:
    """Stands in for a pipeline: counts calls, records prompts (sample() is what is timed)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, **kw):
        self.calls += 1
        assert len(kw["prompt"]) == 1  # one image per timed call
        return None


def test_warmup_calls_are_made_but_not_timed(monkeypatch):
    import tokencompose.evaluation.latency as L

    pipe = CountingPipe()
    monkeypatch.setattr(L, "sample", lambda p, texts, seeds, settings: p(prompt=texts))
    times = time_calls(pipe, GenerationSettings(), "a cat", repeats=3, warmup=2)
    assert pipe.calls == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_run_latency_on_a_tiny_model(tmp_path, model_dir):
    s = LatencySettings(out=str(tmp_path / "lat"), name="tiny", model=ModelSettings(model=str(model_dir), device="cpu"),
                        generation=GenerationSettings(steps=2, scheduler="ddim"), repeats=2, warmup=1)  # fmt: skip
    result = run_latency(s)
    stored = json.loads((tmp_path / "lat" / "results.json").read_text())
    assert stored["kind"] == "latency" and stored["scores"]["repeats"] == 2
    assert stored["scores"]["seconds_per_image"] > 0 and stored["generation"]["steps"] == 2
    assert stored["generation"]["resolution"] == result["generation"]["resolution"] > 0  # the native size, recorded
    with pytest.raises(UserError, match="repeats"):
        run_latency(LatencySettings(out=str(tmp_path / "x"), model=ModelSettings(model=str(model_dir)), repeats=0))


def test_under_a_launch_only_process_0_times(tmp_path, model_dir, monkeypatch):
    """Processes timing side by side would measure each other: the others wait, loading nothing."""
    from tokencompose.evaluation import latency
    from train_util import play_launch

    loads = []
    real_load = latency.load_pipeline
    monkeypatch.setattr(latency, "load_pipeline", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    s = LatencySettings(out=str(tmp_path / "lat"), model=ModelSettings(model=str(model_dir), device="cpu"),
                        generation=GenerationSettings(steps=2, scheduler="ddim"), repeats=1, warmup=0)  # fmt: skip
    results = play_launch(monkeypatch, 2, lambda: run_latency(s))
    assert results[1] == {} and results[0]["kind"] == "latency" and len(loads) == 1
