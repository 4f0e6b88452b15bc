"""Train the shapes-world base model from scratch: the VAE first, then text encoder + UNet.

Scenes are rendered on the fly from ``(seed, index)`` (no dataset on disk), so the stream never
repeats and any step's batch can be re-rendered. Both stages write an atomic checkpoint every
``checkpoint_every`` steps into the work folder and re-running the same command resumes from it
(EDM2-style), so a CPU run can be stopped and continued at will. ``export`` writes a diffusers
folder (fp16 safetensors by default) that :func:`tokencompose.models.load_components` and
``StableDiffusionPipeline.from_pretrained`` load.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tokencompose.atomic import atomic_write_text
from tokencompose.data.shapes import check_world, render_scene, scene_record, world_categories
from tokencompose.errors import UserError
from tokencompose.losses import denoise_loss
from tokencompose.models import Components, clip_tokenizer, save_text_encoder
from tokencompose.pretrain.arch import ShapesArch, build_scheduler, build_text_encoder, build_unet, build_vae
from tokencompose.pretrain.state import load_state, rng_state, save_state, set_rng_state
from tokencompose.tokens import input_ids
from tokencompose.train.ema import EMA
from tokencompose.typed_data import load_settings

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    """The base-model recipe. Every field can be overridden as ``key=value`` on the command line."""

    arch: ShapesArch = field(default_factory=ShapesArch)
    """Sizes of the VAE, text encoder and UNet."""
    seed: int = 0
    """Seed of the scene stream and of the initial weights."""
    min_objects: int = 1
    """Fewest objects in a scene."""
    max_objects: int = 3
    """Scenes hold 1..max_objects objects: the base learns single objects and simple pairs."""
    world: str = "attributes"
    """Which categories scenes hold (:data:`tokencompose.data.shapes.WORLDS`): ``attributes``, every colour in
    every shape (24; the shipped 8x8 base), or ``nouns``, one fixed shape per colour (6; objects are atomic
    like COCO nouns, so nothing can leak between attribute words)."""
    vae_steps: int = 2500
    """Optimizer steps of stage 1 (the VAE)."""
    vae_batch: int = 16
    """Batch size of stage 1."""
    vae_lr: float = 1e-3
    """Learning rate of stage 1."""
    kl_weight: float = 1e-6
    """Weight of the VAE's KL term (small: a near-deterministic autoencoder, as SD's)."""
    unet_steps: int = 12000
    """Optimizer steps of stage 2 (text encoder + UNet, denoising loss)."""
    unet_batch: int = 32
    """Batch size of stage 2."""
    unet_lr: float = 5e-4
    """UNet learning rate of stage 2."""
    text_lr: float = 2e-4
    """Text-encoder learning rate of stage 2."""
    warmup: int = 200
    """Linear warm-up steps of both stages."""
    ema_decay: float = 0.999
    """EMA decay of the UNet (the exported weights are the EMA)."""
    caption_dropout: float = 0.1
    """Share of empty captions, so classifier-free guidance works at sampling time."""
    checkpoint_every: int = 250
    """Steps between resumable checkpoints."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    workers: int = 0
    """Processes rendering the next batches while the networks train (0: rendered in line). The batches are
    the same either way (step ``i``'s batch depends on ``(seed, i)`` only); on a GPU, rendering 32 scenes
    (~50 ms on one core) would otherwise bound the step rate."""
    device: str = "auto"
    """Where the networks train: ``auto`` (a GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:1``.
    Scenes are rendered on the CPU either way. The shipped bases were trained on the CPU; on a GPU the
    noise draws come from its generator, so the weights differ (not the recipe)."""


def _device(cfg: PretrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except RuntimeError as err:
        raise UserError(f"device {cfg.device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {cfg.device} asked for, but torch sees no GPU here: use device=cpu")
    return device


def _stream_batch(cfg: PretrainConfig, start: int, n: int, stream: int) -> tuple[torch.Tensor, list[str]]:
    """Scenes ``start .. start+n`` of stream ``stream`` -> images ``[n, 3, S, S]`` in [-1, 1] and captions."""
    images, captions = [], []
    size = cfg.arch.image_size
    for i in range(start, start + n):
        objects, text, _ = scene_record(
            cfg.seed * 1000 + stream,
            i,
            size,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
            world=world_categories(cfg.world),
        )
        image, _, _ = render_scene(objects, size)
        images.append(torch.from_numpy(image))
        captions.append(text)
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


class _Batches(torch.utils.data.Dataset):
    """Steps ``start .. stop - 1`` of a stream, one item a batch (:func:`_stream_batch`), for worker processes."""

    def __init__(self, cfg: PretrainConfig, batch: int, stream: int, start: int, stop: int) -> None:
        self.cfg, self.batch, self.stream, self.start, self.stop = cfg, batch, stream, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[str]]:
        return _stream_batch(self.cfg, (self.start + i) * self.batch, self.batch, self.stream)


def _batches(cfg: PretrainConfig, batch: int, stream: int, start: int, stop: int) -> Any:
    """The batches of steps ``start .. stop - 1`` in order: rendered in line, or ahead by ``cfg.workers``."""
    data = _Batches(cfg, batch, stream, start, stop)
    if cfg.workers <= 0:
        return (data[i] for i in range(len(data)))
    # Its own generator: the loader draws its workers' seed from it, not from the global stream the noise uses.
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.workers, prefetch_factor=4,
                                       generator=torch.Generator().manual_seed(0))  # fmt: skip


def _progress(total: int, start: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=5)


def train_vae(cfg: PretrainConfig, work: Path) -> Path:
    """Stage 1: AutoencoderKL on rendered scenes (MSE + small KL). Returns the finished VAE folder."""
    done = work / "vae"
    if (done / "config.json").is_file():
        return done
    torch.manual_seed(cfg.seed)
    device = _device(cfg)
    vae = build_vae(cfg.arch).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ckpt = work / "vae_state.pt"
    step, state = 0, load_state(ckpt)
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        set_rng_state(state["rng"])
        log.info("VAE: resuming at step %d", step)
    bar = _progress(cfg.vae_steps, step, "VAE")
    vae.train()
    for x, _ in _batches(cfg, cfg.vae_batch, 1, step, cfg.vae_steps):
        x = x.to(device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        rec = F.mse_loss(recon, x)
        kl = post.kl().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        for g in opt.param_groups:  # cosine decay: the last steps polish edges
            g["lr"] = cfg.vae_lr * 0.5 * (1 + np.cos(np.pi * step / cfg.vae_steps))
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(mse=f"{rec.item():.4f}", kl=f"{kl.item():.2f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            save_state({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng_state()}, ckpt)
    bar.close()
    vae.eval()
    # SD rescales latents to unit variance (0.18215 for SD 1.x); measure ours on fresh scenes.
    with torch.no_grad():
        x, _ = _stream_batch(cfg, 0, 256, stream=2)
        z = vae.encode(x.to(device)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    tmp = work / "vae.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    os.replace(tmp, done)
    return done


def train_diffusion(cfg: PretrainConfig, work: Path) -> Path:
    """Stage 2: text encoder + UNet with the denoising loss only, latents from the frozen VAE."""
    from diffusers import AutoencoderKL

    done = work / "diffusion"
    if (done / "unet" / "config.json").is_file():
        finished = _finished_step(done, cfg)
        if finished == cfg.unet_steps:
            return done
        if finished > cfg.unet_steps:
            raise UserError(f"{work}'s stage 2 finished at step {finished}; it cannot be exported at an earlier "
                            f"step ({cfg.unet_steps}): ask for unet_steps >= {finished}")  # fmt: skip
        log.info("diffusion: continuing from step %d to %d", finished, cfg.unet_steps)  # a longer recipe
    device = _device(cfg)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False).to(device)
    tokenizer = clip_tokenizer()
    torch.manual_seed(cfg.seed + 1)
    unet, text = build_unet(cfg.arch).to(device), build_text_encoder(cfg.arch).to(device)
    scheduler = build_scheduler()
    opt = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": cfg.unet_lr}, {"params": text.parameters(), "lr": cfg.text_lr}],
        weight_decay=1e-2,
    )
    trained = torch.nn.ModuleList([unet, text])  # one EMA over both parts
    ema = EMA(trained, cfg.ema_decay)
    ckpt = work / "diffusion_state.pt"
    step, state = 0, load_state(ckpt)
    if state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        step = state["step"]
        set_rng_state(state["rng"])
        log.info("diffusion: resuming at step %d", step)
        if step > cfg.unet_steps:
            raise UserError(f"{ckpt} is at step {step}, past unet_steps={cfg.unet_steps}: the EMA there is step "
                            f"{step}'s, not step {cfg.unet_steps}'s; ask for unet_steps >= {step}")  # fmt: skip
    alphas = scheduler.alphas_cumprod.to(device)
    bar = _progress(cfg.unet_steps, step, "UNet+text")
    unet.train()
    text.train()
    t_start, seen = time.perf_counter(), 0
    for x, captions in _batches(cfg, cfg.unet_batch, 3, step, cfg.unet_steps):
        drop = torch.rand(len(captions)) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        ids = input_ids(tokenizer, captions).to(device)
        with torch.no_grad():
            z = vae.encode(x.to(device)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(z)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z),)).to(device)  # CPU draw: as before
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        pred = unet(noisy, t, text(ids)[0]).sample
        loss = denoise_loss(pred, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text.parameters()], 1.0)
        warm = min(1.0, (step + 1) / max(1, cfg.warmup))
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = cfg.unet_lr * warm, cfg.text_lr * warm
        opt.step()
        ema.step(trained)
        step += 1
        seen += len(z)
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", sps=f"{seen / (time.perf_counter() - t_start):.1f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            state = {
                "unet": unet.state_dict(),
                "text": text.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.state_dict(),
                "step": step,
                "rng": rng_state(),
            }
            save_state(state, ckpt)
    bar.close()
    ema.copy_to(trained)
    tmp = work / "diffusion.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    save_text_encoder(text, tmp / "text_encoder")
    (tmp / "progress.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(done, ignore_errors=True)  # a shorter finished run being continued: its state went on
    os.replace(tmp, done)
    return done


def _finished_step(done: Path, cfg: PretrainConfig) -> int:
    """The step a finished stage 2 folder was exported at (folders from before this record: the recipe's)."""
    path = done / "progress.json"
    return int(json.loads(path.read_text())["step"]) if path.is_file() else cfg.unet_steps


def export(cfg: PretrainConfig, work: Path, out: Path, fp16: bool = True) -> Path:
    """Assemble a diffusers folder (``unet vae text_encoder tokenizer scheduler``) from a finished work folder.

    ``fp16`` stores the weights in half precision (a few MB); loading upcasts to float32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    dtype = torch.float16 if fp16 else torch.float32
    comps = Components(
        unet=UNet2DConditionModel.from_pretrained(work / "diffusion" / "unet").to(dtype),
        vae=AutoencoderKL.from_pretrained(work / "vae").to(dtype),
        text_encoder=CLIPTextModel.from_pretrained(work / "diffusion" / "text_encoder").to(dtype),
        tokenizer=clip_tokenizer(),
        scheduler=build_scheduler(),
    )
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    comps.save(tmp)
    recipe = asdict(cfg)
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# Fields a work folder may be resumed with other values of: where and how fast it runs, how often it saves,
# and how long stage 2 runs (its learning rate is constant after warm-up, so a shorter run is a prefix of a
# longer one: the documented way to export a run stopped early).
_RESUMABLE = ("unet_steps", "checkpoint_every", "threads", "workers", "device")


def _check_work(cfg: PretrainConfig, work: Path) -> None:
    """Refuse a work folder begun with another recipe: resuming it would mix two recipes in one model."""
    path = work / "recipe.json"
    if not path.is_file():
        return
    from tokencompose.evaluation.provenance import first_mismatch

    old, new = json.loads(path.read_text()), json.loads(json.dumps(asdict(cfg), default=str))
    free = set(_RESUMABLE) | ({"vae_steps"} if (work / "vae" / "config.json").is_file() else set())
    kept = [k for k in old if k not in free]  # fields a newer recipe added are not in an older folder's record
    found = first_mismatch({k: old[k] for k in kept}, {k: new.get(k) for k in kept})
    if found:
        key, there, now = found
        raise UserError(
            f"{work} holds a pretraining run with another recipe ({key} {there!r} there, {now!r} now): "
            "use another --work, or delete the folder to start over"
        )


def pretrain(cfg: PretrainConfig, work: str | Path, out: str | Path | None = None) -> Path:
    """Run (or resume) both stages in ``work`` and export to ``out`` (default ``work/model``).

    A work folder begun with another recipe is refused (only the fields in ``_RESUMABLE`` may change).
    """
    check_world(cfg.world)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    _check_work(cfg, work)
    atomic_write_text(work / "recipe.json", json.dumps(asdict(cfg), indent=2, default=str))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_vae(cfg, work)
    train_diffusion(cfg, work)
    return export(cfg, work, Path(out) if out else work / "model")


def trained_world(model: str | Path) -> str:
    """The shapes world a base was trained on: its ``recipe.json``'s ``world`` (``attributes`` when it has none,
    as bases trained before worlds existed, or a model not made by ``pretrain``)."""
    recipe = Path(model) / "recipe.json"
    return json.loads(recipe.read_text()).get("world", "attributes") if recipe.is_file() else "attributes"


def load_pretrain_config(source: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """A recipe YAML (or the default recipe) + dotted ``key=value`` overrides -> :class:`PretrainConfig`.

    Unknown keys and ill-typed values raise :class:`tokencompose.config.ConfigError` naming the key.
    """
    return load_settings(PretrainConfig, None, overrides, source)
