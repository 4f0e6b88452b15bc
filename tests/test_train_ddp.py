"""Two CPU processes (gloo DDP) with batch 2 each make the same update as one process with batch 4."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tokencompose.config import dump_yaml, load_config
from train_util import THREADS_ENV, config_dict, free_port, load_unet_weights, make_base, make_data


def _losses(run_dir):
    return [json.loads(line)["loss/total"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_two_process_update_equals_one_process_with_the_global_batch(tmp_path, family):
    from tokencompose.train import train

    base, data = make_base(tmp_path, family), make_data(tmp_path, num=8)
    # AdamW with a huge eps is linear in the gradient (update ~ lr * g / eps) for its first step, so a
    # wrong loss reduction (a sum, or a per-process mean scaled by the process count) changes the update;
    # no weight decay or clipping to hide it.
    common = ["train.max_steps=2", "optim.lr=1e-1", "optim.eps=10", "optim.weight_decay=0", "optim.max_grad_norm=0",
              "log.curves=false", "log.tensorboard=false"]  # fmt: skip
    one = train(load_config(config_dict(base, data, tmp_path / "one"), [*common, "train.batch_size=4"]))

    two_dir = tmp_path / "two"
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(dump_yaml(load_config(config_dict(base, data, two_dir), [*common, "train.batch_size=2"])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tokencompose.cli", "train", str(cfg_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **THREADS_ENV}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((two_dir / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["effective_batch"] == 4

    w0 = load_unet_weights(base)
    w1 = load_unet_weights(one.checkpoint)
    w2 = load_unet_weights(two_dir / "checkpoints" / "step-00000002")
    d1 = torch.cat([(w1[k] - w0[k]).flatten() for k in w0])
    d2 = torch.cat([(w2[k] - w0[k]).flatten() for k in w0])
    assert d1.abs().max() > 1e-4  # a real update
    if family == "sdxl":  # its pooled-text + time-id embedding trains too
        add = [k for k in w0 if k.startswith("add_embedding.")]
        assert add and all(not torch.equal(w1[k], w0[k]) for k in add)
    # Equal up to float rounding of the gradient all-reduce (a wrong reduction is off by a factor of ~2).
    err = float((d2 - d1).abs().max() / d1.abs().max())
    assert err < 1e-4, err
    assert float((d2 - d1).norm() / d1.norm()) < 1e-4
    # Logged losses are averages over the global batch, too.
    assert _losses(two_dir) == pytest.approx(_losses(one.run_dir), rel=1e-5)
