"""kill -9 in the middle of a run, rerun the same command: the result equals an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tokencompose.config import dump_yaml, load_config
from tokencompose.train.checkpoint import list_checkpoints
from train_util import THREADS_ENV, config_dict, load_unet_weights, make_base, make_data

MAX_STEPS = 10


def _cli(config_path, cwd):
    env = {**os.environ, **THREADS_ENV, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tokencompose.cli", "train", str(config_path)]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kill9_and_rerun_resumes_bit_exact(tmp_path, family):
    from tokencompose.train import train

    base, data = make_base(tmp_path, family), make_data(tmp_path, num=6)
    # 6 samples, batch 2, 2 micro-batches per step: checkpoints fall mid-epoch; flips are random.
    overrides = [f"train.max_steps={MAX_STEPS}", "train.grad_accum=2", "data.flip=true", "checkpoint.every=2",
                 "checkpoint.keep_last=2", "log.every=1", "log.curves=false", "log.tensorboard=false"]  # fmt: skip
    reference = train(load_config(config_dict(base, data, tmp_path / "reference"), overrides))

    run_dir = tmp_path / "killed"
    config_path = tmp_path / "killed.yaml"
    config_path.write_text(dump_yaml(load_config(config_dict(base, data, run_dir), overrides)))
    proc = _cli(config_path, tmp_path)
    deadline = time.monotonic() + 120
    while not list_checkpoints(run_dir / "checkpoints"):
        assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    done = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    assert proc.returncode == -signal.SIGKILL
    assert max(done) < MAX_STEPS, "the run finished before it could be killed"

    proc = _cli(config_path, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resumed from" in out

    final = list_checkpoints(run_dir / "checkpoints")[-1]
    assert final[0] == MAX_STEPS
    got, want = load_unet_weights(final[1]), load_unet_weights(reference.checkpoint)
    assert got.keys() == want.keys()
    base_weights = load_unet_weights(base)
    assert not all(torch.equal(base_weights[k], want[k]) for k in want), "the reference did not train"
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ from an uninterrupted run"
    # The logged losses match step for step, so data order, flips, noise, timesteps and (SDXL) the size/crop
    # conditioning resumed exactly.
    assert _strip_timing(_rows(run_dir)) == _strip_timing(_rows(reference.run_dir))
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "peak_mem_gib")} for r in rows]


def test_extending_a_finished_run_equals_a_longer_run_with_roi_head(tmp_path):
    """Resume (in process) also restores extra-term state: train 2 steps, raise max_steps to 4, rerun."""
    from safetensors.torch import load_file

    from tokencompose.train import train

    base, data = make_base(tmp_path), make_data(tmp_path, num=6)
    over = ["loss.roi_weight=0.1", "loss.roi_embed_dim=16", "optim.lr=1e-2", "data.flip=true", "log.curves=false",
            "log.tensorboard=false", "checkpoint.every=100"]  # fmt: skip
    straight = train(load_config(config_dict(base, data, tmp_path / "straight"), [*over, "train.max_steps=4"]))
    first = train(load_config(config_dict(base, data, tmp_path / "extended"), [*over, "train.max_steps=2"]))
    assert first.step == 2
    extended = train(load_config(config_dict(base, data, tmp_path / "extended"), [*over, "train.max_steps=4"]))
    assert extended.step == 4
    a, b = load_unet_weights(extended.checkpoint), load_unet_weights(straight.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in b)
    ha, hb = (load_file(str(r.checkpoint / "roi_head.safetensors")) for r in (extended, straight))
    assert all(torch.equal(ha[k], hb[k]) for k in hb)
