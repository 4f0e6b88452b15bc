"""``tokencompose evaluate multigen|grounding``: MultiGen scores and attention-grounding scores of a model.

multigen: prompts -> images (skipped when present) -> detections (stored, skipped when present) -> scores
(MG_k ± std, bootstrap CI) in ``OUT/results.json``. ``--rescore OUT/results.json --threshold T`` recomputes
the scores from the stored detections only (no GPU). Under ``accelerate launch`` each process takes a
shard of the images; process 0 scores once all shards are done.

grounding: captioned images with phrase masks (a Source-A jsonl, or a freshly rendered shapes world) ->
mean IoU over a threshold sweep and AUROC of each phrase's cross-attention against its mask.
"""

from __future__ import annotations

import argparse
import logging

from tokencompose.commands.generate import add_generation_arguments, add_model_arguments, add_prompt_arguments

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION", required=True)
    mg = sub.add_parser("multigen", help="MultiGen: generate, detect, score (MG_k ± std, 95%% CI)")
    mg.add_argument("--out", required=True, help="output folder (images/, detections*.jsonl, results.json)")
    mg.add_argument("--images", default=None, help="image folder (default OUT/images)")
    mg.add_argument("--name", default=None, help="label of this model in comparison tables")
    mg.add_argument("--skip-generation", action="store_true", help="score images already in the image folder")
    mg.add_argument("--rescore", default=None, help="a results.json: rescore its stored detections (no model)")
    mg.add_argument("--output", default=None, help="results file (default OUT/results.json)")
    d = mg.add_argument_group("detector")
    d.add_argument("--detector", default="google/owlv2-large-patch14-ensemble", help="hub id, folder, or 'shapes'")
    d.add_argument("--detector-revision", default=None)
    d.add_argument("--detector-batch-size", type=int, default=16)
    d.add_argument("--detector-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    d.add_argument("--query-template", default=None, help="default: 'a photo of a {category}' (OWL), '{category}'")
    d.add_argument("--queries", default="vocabulary", choices=["vocabulary", "prompt"])
    d.add_argument("--threshold", type=float, default=0.1, help="a category counts when a box scores above this")
    d.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples for the 95%% CI (0: none)")
    add_model_arguments(mg)
    mg.set_defaults(model=None)
    for action in mg._actions:  # --model is not needed for --rescore / --skip-generation
        if action.dest == "model":
            action.required = False
    add_prompt_arguments(mg)
    add_generation_arguments(mg)

    gr = sub.add_parser("grounding", help="attention grounding: phrase attention vs masks (mIoU sweep, AUROC)")
    gr.add_argument("--out", required=True, help="output folder (results.json)")
    gr.add_argument("--name", default=None)
    add_model_arguments(gr)
    src = gr.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="Source-A metadata.jsonl with phrase masks")
    src.add_argument("--shapes", type=int, help="render this many shapes-world scenes and use them")
    gr.add_argument("--shapes-seed", type=int, default=12345, help="scenes unseen in training by default")
    gr.add_argument("--image-size", type=int, default=512)
    gr.add_argument("--eval-size", type=int, default=None, help="mask/score resolution (default: the image size)")
    gr.add_argument("--timesteps", default="100,300,500", help="comma-separated noise timesteps")
    gr.add_argument("--layers", default="mid,up", help="cross-attention layers to aggregate (mid, up, down, patterns)")
    gr.add_argument("--thresholds", default=",".join(f"{0.1 * i:.1f}" for i in range(1, 10)))
    gr.add_argument("--batch-size", type=int, default=4)
    gr.add_argument("--limit", type=int, default=None, help="first N images only")
    gr.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.evaluation == "multigen":
        return run_multigen(args)
    return run_grounding(args)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def run_multigen(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tokencompose.commands.generate import (
        model_record,
        resolve_device_and_shard,
        resolve_model_args,
        resolve_prompts,
        run_generation,
        settings_from_args,
    )
    from tokencompose.evaluation.detectors import default_template, detector_kind, load_detector
    from tokencompose.evaluation.multigen import (
        detect_folder,
        detection_record,
        multigen_result,
        precheck_detections,
        prompts_digest,
    )
    from tokencompose.evaluation.prompts import load_prompts, save_prompts
    from tokencompose.evaluation.results import load_result, read_detections, write_json_atomic

    if args.rescore:
        old = load_result(args.rescore)
        folder = Path(args.rescore).parent
        prompts = load_prompts(folder / old["prompts"]["saved"])
        n = old["scores"]["images_per_prompt"]
        derived = ("kind", "threshold", "scores", "environment", "created", "_path")
        provenance = {k: v for k, v in old.items() if k not in derived}
        provenance["rescored_from"] = str(args.rescore)
        result = multigen_result(
            read_detections(folder), prompts, n, args.threshold, args.bootstrap, provenance=provenance
        )
        out = Path(args.output or folder / f"results_thr{args.threshold:g}.json")
        write_json_atomic(out, result)
        _print_scores(result, out)
        return 0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_dir = Path(args.images or out_dir / "images")
    prompts, info = resolve_prompts(args)
    device, shard, num_shards, state = resolve_device_and_shard(args)
    info.update(saved="prompts.json", sha256=prompts_digest(prompts))
    settings = settings_from_args(args)
    resolve_model_args(args)
    # Everything that can be refused is checked before the hours of generation.
    kind = detector_kind(args.detector, args.detector_revision)
    # The shapes detector has one fixed template; the others take --query-template.
    template = default_template(kind) if kind == "shapes" else (args.query_template or default_template(kind))
    early = detection_record(
        kind, args.detector, template, args.queries, prompts, _torch_dtype(args.detector_dtype), None
    )
    precheck_detections(out_dir, early)
    if not args.skip_generation:
        if not args.model:
            raise SystemExit("--model is required unless --skip-generation or --rescore")
        run_generation(args, prompts, image_dir, device, shard, num_shards)
    detector = load_detector(
        args.detector,
        revision=args.detector_revision,
        device=device,
        dtype=_torch_dtype(args.detector_dtype),
        template=args.query_template,
        batch_size=args.detector_batch_size,
    )
    detect_folder(
        detector,
        prompts,
        image_dir,
        out_dir,
        settings.images_per_prompt,
        queries=args.queries,
        batch_size=args.detector_batch_size,
        shard=shard,
        num_shards=num_shards,
        on_batch=lambda done, total: log.info("detected %d/%d", done, total),
    )
    if state is not None:
        state.wait_for_everyone()
    if shard != 0:
        return 0
    save_prompts(prompts, out_dir / "prompts.json")  # what --rescore reads: these prompts' detections only
    gen_file = image_dir / "generation.json"
    result = multigen_result(
        read_detections(out_dir),
        prompts,
        settings.images_per_prompt,
        args.threshold,
        args.bootstrap,
        provenance={
            "name": args.name,
            "model": model_record(args) if args.model else None,
            "prompts": info,
            "generation": json.loads(gen_file.read_text()) if gen_file.is_file() else None,
            "images": str(image_dir),
            "detector": {
                "id": str(args.detector),
                "revision": getattr(detector, "resolved_revision", None),
                "template": detector.template,
                "queries": args.queries,
                "dtype": args.detector_dtype,
            },
            "seeds": {"base_seed": args.seed, "image_seed": "sha256('tokencompose/<seed>/<uid>/<index>')[:8]"},
            "shards": num_shards,
            "device": str(device),
        },
    )
    out = Path(args.output or out_dir / "results.json")
    write_json_atomic(out, result)
    _print_scores(result, out)
    return 0


def _print_scores(result: dict, path) -> None:
    s = result["scores"]
    cells = [f"MG{k + 1} {p:.2f} ± {d:.2f}" for k, (p, d) in enumerate(zip(s["mg_percent"], s["mg_std"], strict=True))]
    print(f"{path}: threshold {s['threshold']:g}, {s['num_prompts']} prompts x {s['images_per_prompt']} images")
    print("  " + " | ".join(cells))


def run_grounding(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader

    from tokencompose.commands.generate import model_record, resolve_device_and_shard, resolve_model_args
    from tokencompose.data.dataset import TokenDataset, collate
    from tokencompose.evaluation.generation import build_pipeline
    from tokencompose.evaluation.grounding import evaluate_grounding
    from tokencompose.evaluation.results import now_iso, package_versions, write_json_atomic

    args.shard, args.num_shards = 0, 1
    device, *_ = resolve_device_and_shard(args)
    resolve_model_args(args)
    pipe = build_pipeline(
        args.model, unet=args.unet, lora=args.lora, lora_scale=args.lora_scale, device=device, dtype=args.dtype
    )
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.shapes:
            from tokencompose.data.shapes import make_shapes_dataset

            data = make_shapes_dataset(tmp, num=args.shapes, seed=args.shapes_seed, size=args.image_size)
            data_info = {"source": "shapes", "num": args.shapes, "seed": args.shapes_seed}
        else:
            data, data_info = Path(args.data), {"source": args.data}
        eval_size = args.eval_size or args.image_size
        ds = TokenDataset(data, pipe.tokenizer, image_size=args.image_size, attention_sizes=[(eval_size, eval_size)])
        if args.limit:
            ds = torch.utils.data.Subset(ds, range(min(args.limit, len(ds))))
        loader = DataLoader(ds, batch_size=args.batch_size, collate_fn=collate)
        from diffusers import DDPMScheduler

        scores = evaluate_grounding(
            pipe.unet,
            pipe.vae,
            pipe.text_encoder,
            DDPMScheduler.from_config(pipe.scheduler.config),  # the training noise schedule
            loader,
            timesteps=[int(t) for t in args.timesteps.split(",")],
            layers=[x.strip() for x in args.layers.split(",")],
            eval_size=(eval_size, eval_size),
            thresholds=[float(x) for x in args.thresholds.split(",")],
            seed=args.seed,
        )
    result = {
        "kind": "grounding",
        "name": args.name,
        "model": model_record(args),
        "data": {**data_info, "image_size": args.image_size, "eval_size": eval_size, "limit": args.limit},
        "layers": args.layers,
        "seed": args.seed,
        "dtype": str(pipe.unet.dtype),
        "device": str(device),
        "scores": scores,
        "environment": package_versions(),
        "created": now_iso(),
    }
    out = out_dir / "results.json"
    write_json_atomic(out, result)
    print(f"{out}: best mIoU {scores['best_miou']:.4f} (thr {scores['best_threshold']:g}), AUROC {scores['auroc']:.4f}")
    return 0
