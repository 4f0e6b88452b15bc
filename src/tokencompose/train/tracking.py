"""Experiment tracking through Accelerate's trackers: TensorBoard by default, any other installed one on request.

The trackers get the resolved config (flattened scalars as hyperparameters; TensorBoard also gets the
YAML as text), the scalars of every log row, and at every checkpoint a grid of sample images drawn
from the current weights. ``metrics.jsonl`` is written beside them by
:class:`~tokencompose.train.metrics.MetricsWriter` (the report and the curves read it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokencompose.config import Config, ConfigError, dump_yaml, to_dict
from tokencompose.data.dataset import TokenDataset
from tokencompose.families import family_of
from tokencompose.loading import make_scheduler, pipeline_from_components, scheduler_config
from tokencompose.models import Components

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL.Image import Image


log = logging.getLogger(__name__)

Scalar = int | float | str | bool

# Run names for the trackers that take one (the run folder's name); the others name runs themselves.
_RUN_NAME_KWARG = {"wandb": "name", "mlflow": "run_name"}


def check_trackers(names: Sequence[str]) -> None:
    """Refuse a tracker Accelerate does not know or whose package is not installed (before any model loads).

    Accelerate itself would drop an uninstalled tracker with a debug message and train unlogged.
    """
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [t.value for t in LoggerType if t.value not in ("all", "tensorboard")]
    available = {t.value for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError("log.trackers", f"unknown tracker {name!r}; Accelerate has {', '.join(known)}")
        if name not in available:
            raise ConfigError("log.trackers", f"{name} is not installed (pip install {name}), or drop it")


def flat_hparams(data: dict[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """Nested config data -> ``{dotted key: scalar}``: lists and None become strings.

    TensorBoard's hparams (and MLflow's params) take scalars only.
    """
    out: dict[str, Scalar] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = str(value)
    return out


def start_trackers(accelerator: Accelerator, cfg: Config, resume_step: int, prompts: Sequence[str] = ()) -> None:
    """Open the run's trackers (main process) and store the config; ``resume_step`` > 0 on a resumed run.

    TensorBoard writes to ``RUN_DIR/tensorboard`` whatever ``log.project`` is, so it is handed to
    Accelerate as a ready tracker rather than by name (Accelerate would put it under the project name).
    """
    if not accelerator.is_main_process:
        return
    run_dir = Path(cfg.run_dir)
    if cfg.log.tensorboard:
        from accelerate.tracking import TensorBoardTracker

        # purge_step drops events a killed run wrote after the checkpoint we resume from.
        purge = {"purge_step": resume_step + 1} if resume_step else {}
        accelerator.log_with.append(TensorBoardTracker("tensorboard", run_dir, **purge))
    init_kwargs = {name: {kwarg: run_dir.name} for name, kwarg in _RUN_NAME_KWARG.items()}
    accelerator.init_trackers(cfg.log.project, config=flat_hparams(to_dict(cfg)), init_kwargs=init_kwargs)
    if cfg.log.tensorboard:
        # Fenced, so that TensorBoard's markdown keeps the YAML's indentation.
        text = {"config": f"```yaml\n{dump_yaml(cfg)}```"}
        if prompts:
            text["samples/prompts"] = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts))
        accelerator.get_tracker("tensorboard").log(text, step=resume_step)


def log_row(accelerator: Accelerator, step: int, row: dict[str, Any]) -> None:
    """A log row's numbers to every tracker (``epoch`` stays in metrics.jsonl)."""
    accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}, step=step)


def log_image(accelerator: Accelerator, name: str, image: Image, step: int) -> None:
    """One image to every tracker that takes images (TensorBoard, wandb, ...; not MLflow)."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.tracker.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            tracker.tracker.flush()
        elif hasattr(tracker, "log_images"):
            tracker.log_images({name: [image]}, step=step)


def sample_prompts(dataset: TokenDataset, n: int, scan: int = 1000) -> list[str]:
    """The first ``n`` distinct captions of the training list (looks at most ``scan`` records)."""
    prompts: list[str] = []
    for i in range(min(len(dataset), scan)):
        caption = dataset.record(i).caption
        if caption not in prompts:
            prompts.append(caption)
        if len(prompts) == n:
            break
    return prompts


@dataclasses.dataclass
class SampleGrid:
    """Draws ``prompts`` (seeds 0, 1, ...) with the UNet being trained and logs them as one grid image.

    Main process only, on the unwrapped UNet; its processors (the attention capture's among them) and
    its train mode are restored afterwards.
    """

    accelerator: Accelerator
    unet: torch.nn.Module
    comps: Components
    prompts: list[str]
    image_size: int
    steps: int

    @torch.no_grad()
    def draw(self) -> list[Image]:
        """The sample images (PIL), one per prompt."""
        processors = dict(self.unet.attn_processors)
        was_training = self.unet.training
        comps = dataclasses.replace(self.comps, unet=self.unet)
        sampler = family_of(comps).figure_sampler
        pipe = pipeline_from_components(comps, make_scheduler(scheduler_config(self.comps.scheduler), sampler))
        # CPU generators: the same images on every device for a given set of weights.
        generators = [torch.Generator().manual_seed(i) for i in range(len(self.prompts))]
        eager = getattr(torch.compiler, "set_stance", None)  # a compiled UNet would retrace for sampling
        self.unet.eval()
        try:
            with self.accelerator.autocast(), eager("force_eager") if eager else contextlib.nullcontext():
                return pipe(
                    list(self.prompts),
                    num_inference_steps=self.steps,
                    guidance_scale=7.5,  # SD's usual guidance; the samples show progress, not a tuned setting
                    height=self.image_size,
                    width=self.image_size,
                    generator=generators,
                    output_type="pil",
                ).images
        finally:
            self.unet.set_attn_processor(processors)
            self.unet.train(was_training)

    def log(self, step: int) -> None:
        """Draw and log the grid at ``step``."""
        from diffusers.utils import make_image_grid

        images = self.draw()
        log_image(self.accelerator, "samples", make_image_grid(images, rows=1, cols=len(images)), step)


def sample_grid(
    accelerator: Accelerator, cfg: Config, unet: torch.nn.Module, comps: Components, dataset: TokenDataset
) -> SampleGrid | None:
    """The checkpoint sample grid, or None: not the main process, ``log.samples=0``, no tracker, sharded weights."""
    from accelerate.utils import DistributedType

    if not accelerator.is_main_process or cfg.log.samples == 0 or not (cfg.log.tensorboard or cfg.log.trackers):
        return None
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        log.info("no checkpoint samples under %s (the main process does not hold the whole UNet)",
                 accelerator.distributed_type)  # fmt: skip
        return None
    prompts = sample_prompts(dataset, cfg.log.samples)
    return SampleGrid(accelerator, unet, comps, prompts, cfg.data.image_size, cfg.log.sample_steps)
