"""``tokencompose demo``: the whole method, end to end, on the built-in shapes world.

From the shipped shapes-world base model: render a training set of multi-object scenes, fine-tune
(a) with the denoising loss only -- the control -- and (b) with TokenCompose's token and pixel losses,
same data, steps and seed (optionally (c) + ROI alignment); evaluate base, control and TokenCompose
with MultiGen on shapes prompts (exact detector, MG_k with 95% CIs) and with the attention-grounding
metric on held-out scenes; draw the figures and write one HTML report that says what happened.

Every stage writes into the output folder and is skipped when its result is already there, so
re-running the command after an interruption resumes (training resumes at its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tokencompose.atomic import atomic_write_text
from tokencompose.config import load_config
from tokencompose.data.shapes import check_world, make_shapes_dataset, multigen_caption, world_categories
from tokencompose.demo_verdict import paired_effect, summarize, verdict
from tokencompose.errors import UserError
from tokencompose.evaluation.generation import Sampler
from tokencompose.evaluation.prompts import sample_prompts, save_prompts
from tokencompose.evaluation.run import run_grounding, run_multigen
from tokencompose.evaluation.settings import (
    DetectorSettings,
    GenerationSettings,
    GroundingSettings,
    MultiGenSettings,
    PromptSettings,
    ShardSettings,
)
from tokencompose.loading import ModelSettings
from tokencompose.shipped import SHIPPED_BASES, resolve_shipped, shipped_base
from tokencompose.train import train
from tokencompose.visualize.report import build_report
from tokencompose.visualize.run import VisualizeSettings, run_visualize

log = logging.getLogger(__name__)


def resolve_base(base: str | None) -> Path | None:
    """A base given as a folder, or by the name of a shipped base (``shapes_nouns16_wordwise``); None = the default
    one."""
    if not base:
        return shipped_base(SHIPPED_BASES[0])
    return Path(resolve_shipped(base))


@dataclass
class DemoSettings:
    """Sizes of the demo. The defaults fit a few minutes on 2 CPU cores; :data:`SMOKE` about one minute."""

    out: str = "runs/demo"
    """Output folder; re-running resumes from it (a folder holding other settings is refused)."""
    base: str | None = None
    """Base model folder (diffusers layout), or a shipped base's name (``shapes_nouns16_wordwise``,
    ``shapes_nouns16``, ``shapes_base``); None = the shipped ``shapes_nouns16_wordwise``."""
    world: str | None = None
    """The shapes world of the scenes and prompts (``attributes`` | ``nouns``); None = the one the base was trained
    on (its ``recipe.json``)."""
    seed: int = 11
    """Seed of the training scenes, the prompts and the training noise. 11 is a verdict seed: the settings were
    chosen on design seeds (0; 7 in the first pass) on ``shapes_nouns16`` and kept unchanged for the word-wise
    base; 11, 12, 13 were never used while choosing (bench/RESULTS.md, the base's card)."""
    train_images: int = 1000
    """Training scenes rendered from the shapes world."""
    min_objects: int = 2
    """Fewest objects in a training scene."""
    max_objects: int = 4
    """Most objects in a training scene."""
    steps: int = 300
    """Optimizer steps of each fine-tuned arm."""
    batch_size: int = 16
    """Training batch size."""
    lr: float = 1e-4
    """Learning rate of each arm."""
    caption_dropout: float = 0.1
    """Share of training samples on the empty caption (denoising only), as in the bases' pretraining, so the
    unconditional branch that classifier-free guidance subtracts keeps up with the fine-tuned weights. Without it
    the control's guided samples lose objects that its unguided ones keep (design seed 0: MG3 58.9 vs the base's
    72.5), and any loss that slows the fine-tune looks like a gain."""
    ema: float = 0.0
    """EMA decay of each arm's UNet weights; > 0 keeps the average and evaluates it (the arms' weights are then
    their EMA, as the base's are); 0: the last step's weights."""
    token_weight: float = 1e-3
    """lambda: weight of the token loss in the TokenCompose arm (the paper's; on design seed 0, 5e-3 and 5e-2
    cost more objects for the same grounding)."""
    pixel_weight: float = 5e-5
    """gamma: weight of the pixel loss in the TokenCompose arm (the paper's)."""
    roi_weight: float = 0.0
    """> 0 adds a third arm: TokenCompose + ROI-token alignment."""
    prompts: int = 120
    """MultiGen prompts (sampled shapes-world categories). 120: on design seed 0 the paired MG3 difference had a
    minimum detectable effect of 4.5 points with 160 prompts, so 5.2 with 120 in one run and 3.0 over the three
    verdict seeds; 160 would not fit the 10-minute budget with figures."""
    objects_per_prompt: int = 5
    """K: categories named per prompt."""
    images_per_prompt: int = 4
    """Images per prompt, each with its own seed."""
    sample_steps: int = 10
    """Denoising steps when generating. DDIM at 10 steps scores the design seed's arms as DPM-Solver++ at 20 does
    (MG3 within 2 points); DPM-Solver++ at 5 reverses their ranking, so fewer steps are not used."""
    scheduler: Sampler = "ddim"
    """Sampler when generating (a :class:`GenerationSettings` choice: ``ddim``, ``dpm`` = DPM-Solver++, ...)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale when generating."""
    exact_prompts: int = 12
    """Prompts of each exact shapes-world score (spatial relations, colour binding); 0: skip them."""
    grounding_images: int = 64
    """Held-out scenes of the attention-grounding metric."""
    grounding_timesteps: list[int] = field(default_factory=lambda: [200, 500])
    """Noise timesteps the grounding metric reads attention at."""
    figures: bool = True
    """Draw the attention, mask and grid figures."""


# ``tokencompose demo --smoke``: every stage on a tiny scale (checks the wiring, about a minute).
SMOKE = {"train_images": 16, "steps": 2, "batch_size": 4, "prompts": 2, "images_per_prompt": 1, "sample_steps": 2,
         "grounding_images": 4, "exact_prompts": 2}  # fmt: skip

# Fields that do not change any result: a folder made with other values of these is resumed, not refused.
_RESUMABLE = ("out", "figures")


def _check_folder(out: Path, record: dict[str, Any]) -> None:
    """Refuse an output folder that holds a demo run with other settings (its models and scores would mix)."""
    path = out / "demo_settings.json"
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"{out} is not empty and holds no demo run: choose another --out")
        return
    from tokencompose.evaluation.provenance import first_mismatch

    old = json.loads(path.read_text())
    kept = [k for k in record if k not in _RESUMABLE and k in old]  # settings added since are not in old records
    found = first_mismatch({k: old[k] for k in kept}, {k: record[k] for k in kept})
    if found:
        key, there, now = found
        raise UserError(
            f"{out} holds a demo run with other settings ({key} {there!r} there, {now!r} now): "
            "use another --out, or delete the folder to start over"
        )


def _train_arm(s: DemoSettings, base: Path, data: Path, name: str, token: float, pixel: float, roi: float) -> Path:
    """Fine-tune one arm; returns its final checkpoint folder (resumes if the run folder exists)."""
    cfg = load_config(
        {
            "run_dir": str(Path(s.out) / "runs" / name),
            "model": {"path": str(base)},
            "data": {"path": str(data), "image_size": 64, "num_workers": 0, "caption_dropout": s.caption_dropout},
            "loss": {"token_weight": token, "pixel_weight": pixel, "roi_weight": roi, "layers": ["mid", "up"]},
            "optim": {"lr": s.lr, "warmup_steps": min(20, s.steps)},
            "train": {
                "batch_size": s.batch_size,
                "grad_accum": 1,
                "max_steps": s.steps,
                "seed": s.seed,
                "ema": {"enabled": s.ema > 0, "decay": s.ema if s.ema > 0 else 0.9999},
            },
            "log": {"every": max(1, min(10, s.steps)), "tensorboard": False},
            "checkpoint": {"every": max(1, s.steps // 2), "keep_last": 1},
        }
    )
    result = train(cfg)
    return Path(result.checkpoint)


def _evaluate(s: DemoSettings, base: Path, name: str, ckpt: Path | None, prompts: Path, world: str) -> dict[str, Path]:
    """MultiGen and grounding of one arm through the evaluation library (skipped when already scored)."""
    out = Path(s.out) / "eval" / name
    model = ModelSettings(model=str(base), checkpoint=str(ckpt) if ckpt is not None else None, device="cpu",
                          ema=s.ema > 0 and ckpt is not None)  # fmt: skip
    mg = out / "multigen" / "results.json"
    if not mg.is_file():
        run_multigen(
            MultiGenSettings(
                out=str(mg.parent),
                name=name,
                model=model,
                prompts=PromptSettings(prompts=str(prompts)),
                generation=GenerationSettings(steps=s.sample_steps, guidance_scale=s.guidance_scale, resolution=64,
                                              images_per_prompt=s.images_per_prompt, scheduler=s.scheduler,
                                              seed=s.seed),
                detector=DetectorSettings(detector="shapes", queries="prompt"),
                run=ShardSettings(batch_size=16),
            )
        )  # fmt: skip
    gr = out / "grounding" / "results.json"
    if not gr.is_file():
        run_grounding(
            GroundingSettings(out=str(gr.parent), name=name, model=model, shapes=s.grounding_images, resolution=64,
                              shapes_world=world, timesteps=list(s.grounding_timesteps), batch_size=16)
        )  # fmt: skip
    exact = out / "exact" / "results.json"
    if s.exact_prompts > 0 and not exact.is_file():
        from tokencompose.evaluation.shapes_exact_run import (
            ShapesExactSettings,
            ShapesGenerationSettings,
            run_shapes_exact,
        )

        gen = ShapesGenerationSettings(steps=s.sample_steps, guidance_scale=s.guidance_scale, resolution=64,
                                       images_per_prompt=s.images_per_prompt, scheduler=s.scheduler,
                                       seed=s.seed)  # fmt: skip
        run_shapes_exact(ShapesExactSettings(out=str(exact.parent), name=name, model=model, generation=gen,
                                             num_prompts=s.exact_prompts, prompt_seed=s.seed, world=world,
                                             run=ShardSettings(batch_size=16)))  # fmt: skip
    return {"multigen": mg, "grounding": gr, "exact": exact}


# The figures' prompts per world: three, two and three objects; the first is the attention figure's.
FIGURE_PROMPTS: dict[str, list[str]] = {
    "attributes": [
        "a photo of a red circle, a blue square, and a green triangle.",
        "a photo of a yellow cross and a purple circle.",
        "a photo of a cyan square, a red cross, and a blue circle.",
    ],
    "nouns": [
        "a photo of a red circle, a yellow square, and a green triangle.",
        "a photo of a cyan cross and a blue circle.",
        "a photo of a purple square, a green triangle, and a red circle.",
    ],
}


def _figures(s: DemoSettings, base: Path, arms: dict[str, Path | None], heldout: Path, world: str) -> Path:
    """The report's figures through the visualize library: attention per arm, masks vs attention, a grid."""
    out = Path(s.out) / "figures"
    if (out / "figures.json").is_file():
        return out
    model = ModelSettings(model=str(base), device="cpu", ema=s.ema > 0)  # the base itself has no EMA to choose
    checkpoints = [f"{name}={ckpt}" for name, ckpt in arms.items() if ckpt is not None]
    common = dict(
        out=str(out), seed=s.seed, steps=s.sample_steps, guidance_scale=s.guidance_scale, scheduler=s.scheduler
    )
    prompts = FIGURE_PROMPTS[world]
    prompt = prompts[0]
    for name, ckpt in arms.items():
        arm = dataclasses.replace(model, checkpoint=str(ckpt) if ckpt is not None else None)
        run_visualize(VisualizeSettings(figure="attention", model=arm, label=name, prompts=[prompt], **common))
    run_visualize(VisualizeSettings(figure="masks", model=model, checkpoints=checkpoints, data=str(heldout), num=3,
                                    timesteps=[300], **common))  # fmt: skip
    run_visualize(VisualizeSettings(figure="grid", model=model, checkpoints=checkpoints, prompts=prompts, seeds=[0, 1],
                                    **common))  # fmt: skip
    return out  # loss curves: the report draws them from each run's metrics.jsonl


def run_demo(s: DemoSettings) -> dict[str, Any]:
    """Run (or resume) every stage; returns the summary table and writes ``OUT/report.html``."""
    from tqdm.auto import tqdm

    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(s.base)
    if base is None:
        raise UserError(
            "no shapes-world base model is shipped with this install; train one with "
            "`tokencompose pretrain` and pass it with --base runs/shapes_base/model"
        )
    if s.world is not None:
        check_world(s.world)
    from tokencompose.pretrain.recipe import trained_world

    world = s.world or trained_world(base)
    record = {**asdict(s), "base": str(base), "world": world}
    _check_folder(out, record)
    atomic_write_text(out / "demo_settings.json", json.dumps(record, indent=2))
    arms_spec = [("control", 0.0, 0.0, 0.0), ("tokencompose", s.token_weight, s.pixel_weight, 0.0)]
    if s.roi_weight > 0:
        arms_spec.append(("tokencompose_roi", s.token_weight, s.pixel_weight, s.roi_weight))
    stages = tqdm(total=3 + len(arms_spec) + (len(arms_spec) + 1) + int(s.figures), desc="demo", unit="stage")

    data = out / "data" / "train" / "metadata.jsonl"
    if not data.is_file():
        make_shapes_dataset(
            data.parent,
            s.train_images,
            seed=s.seed + 1,
            size=64,
            min_objects=s.min_objects,
            max_objects=s.max_objects,
            world=world,
        )
    heldout = out / "data" / "heldout" / "metadata.jsonl"
    if not heldout.is_file():
        make_shapes_dataset(heldout.parent, 8, seed=s.seed + 2, size=64, min_objects=2, max_objects=3, world=world)
    stages.update(1)
    prompts = out / "prompts.json"
    if not prompts.is_file():
        save_prompts(
            sample_prompts(
                world_categories(world), s.prompts, s.objects_per_prompt, seed=s.seed, text_fn=multigen_caption
            ),
            prompts,
        )
    stages.update(1)

    arms: dict[str, Path | None] = {"base": None}
    for name, token, pixel, roi in arms_spec:
        stages.set_postfix_str(f"training {name}")
        arms[name] = _train_arm(s, base, data, name, token, pixel, roi)
        stages.update(1)
    results = {}
    for name, ckpt in arms.items():
        stages.set_postfix_str(f"evaluating {name}")
        results[name] = _evaluate(s, base, name, ckpt, prompts, world)
        stages.update(1)
    if s.figures:
        stages.set_postfix_str("figures")
        _figures(s, base, arms, heldout, world)
        stages.update(1)
    table = summarize(results)
    effect = paired_effect(results, prompts, s.images_per_prompt, s.seed)
    against_base = paired_effect(results, prompts, s.images_per_prompt, s.seed, reference="base")
    summary = {"kind": "summary", "table": table, "diff": effect, "mde": effect["mde"], "diff_base": against_base,
               "verdict": verdict(table, effect, against_base), "base": str(base), "world": world,
               "settings": asdict(s)}  # fmt: skip
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    build_report([out], out / "report.html", title="TokenCompose demo on the shapes world")
    stages.update(1)
    stages.close()
    return summary
