"""The training loop on Accelerate: resume, accumulate, clip, skip non-finite steps, log, checkpoint.

Host syncs: one boolean per optimizer step (is the step finite? -- needed to skip it before it
touches the weights; fp16's loss scaler needs the same sync anyway) and one packed tensor per log
row. Everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tokencompose.attention import AttentionCapture, no_store_replay_under_checkpoint
from tokencompose.config import Config, validate
from tokencompose.data.dataset import TokenDataset
from tokencompose.data.records import DropCounter
from tokencompose.families import family_of
from tokencompose.losses import column_subset
from tokencompose.models import Components
from tokencompose.sharding import force_cpu
from tokencompose.train import setup
from tokencompose.train.checkpoint import (
    Checkpointer,
    NonFiniteLossError,
    TrainState,
    export_weights,
    latest_checkpoint,
    restore_weights,
)
from tokencompose.train.curves import plot_loss_curves
from tokencompose.train.data import EpochBatchSampler, batch_stream, build_loader, drop_metrics, report_drops, to_device
from tokencompose.train.ema import EMA
from tokencompose.train.metrics import MetricsWriter, RunningSums, peak_memory_gib, read_metrics
from tokencompose.train.resume import RunLock, check_run_dir
from tokencompose.train.runinfo import announce_run
from tokencompose.train.step import Conditioner, LossTerm, LossWeights, NoiseSource, StepOutput, training_step
from tokencompose.train.terms import build_terms
from tokencompose.train.tracking import SampleGrid, check_trackers, log_row, sample_grid, start_trackers

if TYPE_CHECKING:
    from accelerate import Accelerator


log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None  # the final checkpoint folder
    step: int
    nan_skips: int
    metrics: dict[str, float] = field(default_factory=dict)  # the last log row


def train(cfg: Config, extra_terms: Sequence[LossTerm] = ()) -> TrainResult:
    """Train (or resume, when ``cfg.run_dir`` holds checkpoints) and return where the result is.

    The run folder is checked and locked (main process) before anything is loaded: a second trainer on
    the same ``run_dir`` stops with a :class:`~tokencompose.errors.UserError`.
    """
    from accelerate import PartialState

    validate(cfg)
    setup.check_launcher_precision(cfg.train.precision)
    check_trackers(cfg.log.trackers)
    setup.check_layers(cfg)
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    cpu = force_cpu()
    with RunLock(run_dir) if PartialState(cpu=cpu).is_main_process else contextlib.nullcontext():
        return _train(cfg, extra_terms, cpu)


def _train(cfg: Config, extra_terms: Sequence[LossTerm], cpu: bool) -> TrainResult:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    run_dir = Path(cfg.run_dir)
    precision = setup.resolve_precision(cfg.train.precision, PartialState(cpu=cpu).device)
    # Accelerate keeps its state (precision included) per process; a second train() in the same
    # process (a notebook, a sweep, the tests) may use another precision. The process group, held by
    # PartialState, is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=list(cfg.log.trackers) or None,  # TensorBoard joins in start_trackers (its own folder)
        project_dir=str(run_dir),
        cpu=cpu,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["gradient_clipping"] = cfg.optim.max_grad_norm
    main = accelerator.is_main_process
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup.ensure_shapes_data(cfg)
    accelerator.wait_for_everyone()
    setup.seed_everything(cfg)

    # --- models, data, optimizer -----------------------------------------------------------------
    comps = setup.load_models(cfg)
    setup.check_latent_cache(cfg, comps.vae)
    device = accelerator.device
    params = setup.prepare_models(comps, cfg, device, precision)
    lora = cfg.train.lora.rank > 0
    image = (cfg.data.image_size, cfg.data.image_size)
    sizes = family_of(comps).map_sizes(comps, image)
    dataset, collate = setup.build_dataset(cfg, comps, sizes)
    loader, sampler = build_loader(
        dataset,
        collate,
        cfg.train.batch_size,
        cfg.train.seed,
        cfg.data.shuffle,
        cfg.data.num_workers,
        accelerator.num_processes,
        accelerator.process_index,
        pin_memory=device.type == "cuda",
    )

    configured = build_terms(cfg, comps.unet)
    specs = tuple(t.to(device) for t in [*configured, *extra_terms] if t.weight != 0)  # weight 0: not in the step
    groups = [{"params": params, "weight_decay": cfg.optim.weight_decay}]
    groups += [g for t in specs for g in t.param_groups(cfg.optim.weight_decay)]
    optimizer = setup.build_optimizer(groups, cfg.optim)
    # Terms with parameters are prepared (DDP-wrapped) so their gradients are averaged like the UNet's.
    learned = [t for t in specs if any(p.requires_grad for p in t.parameters())]
    unet, optimizer, *prepared = accelerator.prepare(comps.unet, optimizer, *learned)
    wrapped = dict(zip(map(id, learned), prepared, strict=True))
    terms = tuple(wrapped.get(id(t), t) for t in specs)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]

    ema = None
    if cfg.train.ema.enabled:
        ema = EMA(accelerator.unwrap_model(unet), cfg.train.ema.decay)
    noise = NoiseSource(cfg.train.seed, device, accelerator.num_processes, accelerator.process_index)
    state = TrainState(noise, cfg.train.batch_size, cfg.train.grad_accum, accelerator.num_processes)
    ckpt = Checkpointer(
        accelerator,
        run_dir / "checkpoints",
        cfg.checkpoint.keep_last,
        accelerator.unwrap_model(unet),
        export=lambda folder: export_weights(accelerator, unet, ema, lora, folder, specs, family_of(comps)),
        restore=lambda folder: restore_weights(accelerator.unwrap_model(unet), lora, folder),
        state=state,
        ema=ema,
    )

    # --- resume ------------------------------------------------------------------------------------
    ckpt.clean_partial()
    resumed = ckpt.resume()  # the newest readable checkpoint (warns about unreadable newer ones)
    if resumed is not None:
        log.info("resumed from %s at step %d", resumed, state.step,
                     comps.family)  # fmt: skip
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    if main:
        announce_run(cfg, accelerator, precision, global_batch, sum(p.numel() for p in trainable), resumed, state.step,
                     comps.family)  # fmt: skip
    samples = sample_grid(accelerator, cfg, accelerator.unwrap_model(unet), comps, dataset)
    start_trackers(accelerator, cfg, state.step, samples.prompts if samples else ())

    weights = LossWeights(cfg.loss.token_weight, cfg.loss.pixel_weight)
    writer = MetricsWriter(run_dir, state.step) if main else None
    try:
        with contextlib.ExitStack() as stack:
            if cfg.train.compile:  # a checkpointed, captured UNet compiles as one graph
                stack.enter_context(no_store_replay_under_checkpoint())
            capture = None
            if weights.grounding:  # lambda = gamma = 0: no capturing processor at all
                capture = stack.enter_context(
                    AttentionCapture(
                        accelerator.unwrap_model(unet),
                        setup.supervised_layers(cfg, comps),
                        sdpa_output=cfg.loss.capture_sdpa_output,
                        normalize=cfg.loss.normalize,
                    )
                )
            for t in specs:
                stack.enter_context(t.capture(accelerator.unwrap_model(unet)))
            loop = _Loop(
                cfg=cfg, accelerator=accelerator, unet=unet, optimizer=optimizer, trainable=trainable, comps=comps,
                loader=loader, sampler=sampler, dataset=dataset, state=state, noise=noise, ckpt=ckpt, ema=ema,
                writer=writer, samples=samples, weights=weights, capture=capture, terms=terms,
            )  # fmt: skip
            last = loop.run(global_batch)
    except BaseException:
        # Close the local event file; remote trackers (wandb, MLflow) record the failure at exit themselves.
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.finish()
        raise
    final = latest_checkpoint(run_dir / "checkpoints")
    if main and cfg.log.curves and (run_dir / "metrics.jsonl").exists():
        plot_loss_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss_curves.png", cfg.log.smoothing)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # finishes the trackers
    return TrainResult(run_dir, final, state.step, state.nan_skips, last)


@dataclass(kw_only=True)
class _Loop:
    """Everything the step loop touches (built by :func:`train`)."""

    cfg: Config
    accelerator: Accelerator
    unet: torch.nn.Module  # prepared: DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer  # prepared (Accelerate's AcceleratedOptimizer)
    trainable: list[torch.nn.Parameter]
    comps: Components
    loader: torch.utils.data.DataLoader
    sampler: EpochBatchSampler
    dataset: TokenDataset
    state: TrainState
    noise: NoiseSource
    ckpt: Checkpointer
    ema: EMA | None = None
    writer: MetricsWriter | None = None  # main process only
    samples: SampleGrid | None = None  # main process only
    weights: LossWeights = field(default_factory=LossWeights)
    capture: AttentionCapture | None = None
    terms: tuple[LossTerm, ...] = ()  # those with parameters DDP-wrapped when distributed
    sums: RunningSums = field(init=False, default_factory=RunningSums)
    conditioner: Conditioner = field(init=False)

    def __post_init__(self) -> None:
        self.conditioner = Conditioner(self.comps, self.cfg.data.image_size)

    def optimizer_step(
        self, stream: Iterator[tuple[int, dict[str, Any]]], drops: DropCounter, epoch: int
    ) -> tuple[StepOutput, torch.Tensor | None, int]:
        """Accumulate ``grad_accum`` micro-batches, clip, and step unless non-finite; returns the last output."""
        cfg, acc, state = self.cfg, self.accelerator, self.state
        bad = torch.zeros((), dtype=torch.bool, device=acc.device)
        # Set before the backward passes: DeepSpeed's engine steps inside the last one.
        for group in self.optimizer.param_groups:
            group["lr"] = setup.lr_at(state.step, cfg.optim)
        for _ in range(cfg.train.grad_accum):
            batch_epoch, batch = next(stream)
            state.micro += 1
            if batch_epoch != epoch:
                drops.report(log, prefix=f"epoch {epoch} data drops")
                drops.reset()
                epoch = batch_epoch
            drops.update(batch)
            if cfg.loss.capture_columns and self.capture is not None:
                batch["token_columns"], batch["token_index_in_columns"] = column_subset(
                    batch["token_index"], batch["token_valid"]
                )
            batch = to_device(batch, acc.device)
            with acc.accumulate(self.unet, *self.terms):  # no gradient all-reduce before the last micro-batch
                out = training_step(
                    self.unet, self.comps.vae, self.conditioner, self.comps.scheduler, batch, self.weights,
                    self.noise, self.capture, self.terms,
                )  # fmt: skip
                bad |= ~torch.isfinite(out.loss.detach())
                acc.backward(out.loss)
            self.sums.add({**out.terms, **out.parts}, cfg.train.batch_size)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
        norm = acc.clip_grad_norm_(self.trainable, max_norm)
        if norm is not None and acc.mixed_precision != "fp16":  # under fp16 the loss scaler owns overflows
            bad |= ~torch.isfinite(norm)
        if acc.num_processes > 1:  # every process must take the same decision
            bad = acc.reduce(bad.float(), reduction="sum") > 0
        if bool(bad):  # the one host sync per step
            _non_finite(cfg, state, out, applied=str(acc.distributed_type).endswith("DEEPSPEED"))
            if acc.scaler is not None:
                acc.scaler.update()
        else:
            self.sums.add_grad_norm(norm)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(acc.unwrap_model(self.unet))
            for term in self.terms:
                getattr(term, "module", term).after_step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return out, norm, epoch

    def run(self, global_batch: int) -> dict[str, float]:
        """Steps until ``train.max_steps``; logs and checkpoints on schedule; returns the last log row."""
        from tqdm.auto import tqdm

        cfg, state, writer = self.cfg, self.state, self.writer
        drops = DropCounter(self.dataset.drop_counts())
        stream = batch_stream(self.loader, self.sampler, state.micro)
        epoch = state.micro // self.sampler.batches_per_epoch
        bar = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not (writer and cfg.log.progress))
        last: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), state.step
        while state.step < cfg.train.max_steps:
            _, _, epoch = self.optimizer_step(stream, drops, epoch)
            bar.update(1)
            if state.step % cfg.log.every == 0 or state.step == cfg.train.max_steps:
                row = self.sums.reduce(self.accelerator)
                now = time.perf_counter()
                row["lr"] = setup.lr_at(state.step - 1, cfg.optim)
                row["samples_per_s"] = global_batch * (state.step - tick_step) / max(now - tick, 1e-9)
                row["peak_mem_gib"] = peak_memory_gib(self.accelerator.device)
                row["nan_skips"] = state.nan_skips
                row["epoch"] = epoch
                row.update(drop_metrics(drops, self.accelerator))  # the run's drops so far (collective)
                tick, tick_step, last = now, state.step, row
                if writer is not None:
                    writer.write(state.step, row)
                    log_row(self.accelerator, state.step, row)
                    loss = row.get("loss/total", float("nan"))
                    bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
            if state.step % cfg.checkpoint.every == 0 or state.step == cfg.train.max_steps:
                path = self.ckpt.save(state.step, {"epoch": epoch, "micro": state.micro, "nan_skips": state.nan_skips})
                if writer is not None:
                    bar.write(f"checkpoint: {path}")
                if self.samples is not None:
                    self.samples.log(state.step)
        bar.close()
        totals = drop_metrics(drops, self.accelerator)  # collective: every process ends at the same step
        if writer is not None:
            report_drops(drops, epoch, totals, cfg.run_dir)
        if writer is not None and state.nan_skips:
            log.warning("%d optimizer step(s) were skipped for a non-finite loss or gradient", state.nan_skips)
        return last


def _non_finite(cfg: Config, state: TrainState, out: Any, applied: bool = False) -> None:
    """Count a non-finite step, or stop with a message naming the offending terms.

    ``applied``: the step was already taken (DeepSpeed steps inside ``backward``), so it cannot be
    skipped: stop before it reaches a checkpoint.
    """
    state.nan_skips += 1
    bad_terms = [k for k, v in out.terms.items() if not bool(torch.isfinite(v).all())]
    what = f"non-finite loss or gradient at step {state.step + 1} (terms: {', '.join(bad_terms) or 'gradients'})"
    if applied:
        raise NonFiniteLossError(f"{what}; DeepSpeed already applied it, stopping before it is checkpointed")
    if cfg.train.nan_policy == "stop":
        raise NonFiniteLossError(f"{what}; stopping (train.nan_policy=stop). No checkpoint was written for it.")
    if state.nan_skips > cfg.train.max_nan_skips:
        raise NonFiniteLossError(f"{what}; more than train.max_nan_skips={cfg.train.max_nan_skips} skipped steps")
    log.warning("%s: step skipped (%d so far)", what, state.nan_skips)
