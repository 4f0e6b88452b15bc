"""The numbers a shapes-world base's model card states about how it fails (issue #20), from one command.

    python bench/base_card.py --model src/tokencompose/assets/shapes_base --out runs/card_base8
    python bench/base_card.py --model runs/base16/model --out runs/card_base16

Runs, through the library (re-running resumes the image generation):

1. ``evaluate shapes --tasks objects``: prompts of K = 1..4 objects (``--prompts`` in all, prompt seed 0), the
   demo's sampler, the exact detector; per K the share of asked objects that came out correct / wrong shape /
   wrong colour / merged / missing (:mod:`tokencompose.evaluation.shapes_errors`), and K = 1's accuracy;
2. ``evaluate grounding --shapes N``: phrase attention against the rendered masks at timesteps 200 and 500 (the
   demo's), the mean correlation between the maps of two phrases of one image (how alike its tokens' maps are)
   and the specificity (how often a phrase's map is higher on its own object than on another named object of
   the image: 0.5 is chance -- do the tokens' maps differ the right way);

then prints the card's table in markdown and writes ``OUT/card.json``. The issue's criteria are printed beside
it: single-object prompts right >= 95%, multi-object failures dominantly missing or merged, maps distinct.
``--tiny`` runs the same on a tiny random model (a smoke test, meaningless numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def attention_sizes(model: str) -> list[int]:
    """Side of the UNet's cross-attention maps per block at the model's native size (e.g. ``[8, 4, 2]``)."""
    from tokencompose.loading import ModelSettings, load_model

    comps = load_model(ModelSettings(model=model, device="cpu"))
    sample = int(comps.unet.config.sample_size)
    blocks = len(comps.unet.config.block_out_channels)
    return [sample // 2**i for i in range(blocks)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers folder (default: the shipped shapes base)")
    parser.add_argument("--out", default="runs/base_card")
    parser.add_argument("--prompts", type=int, default=120, help="prompts over K = 1..4 (120: 30 per K)")
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--scenes", type=int, default=64, help="held-out scenes of the grounding metric")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--world", help="attributes | nouns (default: the model's recipe.json, else attributes)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, 4 prompts, 2 steps (smoke)")
    args = parser.parse_args()

    from tokencompose.evaluation.run import run_grounding
    from tokencompose.evaluation.settings import GroundingSettings
    from tokencompose.evaluation.shapes_errors import FAILURES, OUTCOMES
    from tokencompose.evaluation.shapes_exact_run import ShapesExactSettings, run_shapes_exact
    from tokencompose.pretrain.recipe import trained_world
    from tokencompose.typed_data import load_settings

    out = Path(args.out)
    model, steps = args.model, 25
    if args.tiny:
        from tokencompose.models import tiny_components

        model, steps = str(out / "tiny_model"), 2
        if not Path(model, "model_index.json").is_file():
            tiny_components(seed=0).save(model)
        args.prompts, args.images, args.scenes = 4, 1, 4
    if model is None:
        from tokencompose.shipped import shipped_base

        model = str(shipped_base())
    world = args.world or trained_world(model)
    start = time.perf_counter()
    shapes = run_shapes_exact(load_settings(ShapesExactSettings, {
        "out": str(out / "objects"), "tasks": ["objects"], "num_prompts": args.prompts, "world": world,
        "model": {"model": model, "device": args.device},
        "generation": {"steps": steps, "images_per_prompt": args.images}}))  # fmt: skip
    grounding = run_grounding(load_settings(GroundingSettings, {
        "out": str(out / "grounding"), "shapes": args.scenes, "shapes_world": world, "timesteps": [200, 500],
        "model": {"model": model, "device": args.device}}))  # fmt: skip
    seconds = time.perf_counter() - start
    objects, gr = shapes["scores"]["objects"], grounding["scores"]
    sizes = attention_sizes(model)

    blocks = " / ".join(f"{s}x{s}" for s in sizes)
    print(f"model: {model}; world {world}; UNet block resolutions {blocks}; {seconds:.0f} s\n")
    print("| K | images | all objects right | " + " | ".join(o.replace("_", " ") for o in OUTCOMES)
          + " | failures missing + merged | wrong shapes leaked | unasked regions per image |")  # fmt: skip
    print("|---" * (len(OUTCOMES) + 6) + "|")
    for k, row in objects["by_k"].items():
        shares = row["failure_shares"]
        fused = "—" if shares is None else f"{100 * (shares['missing'] + shares['merged']):.0f}%"
        leaked = "—" if row["wrong_shape_leaked"] is None else f"{100 * row['wrong_shape_leaked']:.0f}%"
        print(f"| {k} | {row['images']} | {row['all_correct']:.1f}% | "
              + " | ".join(f"{row['rates'][o]:.3f}" for o in OUTCOMES)
              + f" | {fused} | {leaked} | {row['extra_per_image']:.2f} |")  # fmt: skip
    multi = objects["multi"] or {}
    shares = multi.get("failure_shares") or {f: 0.0 for f in FAILURES}
    fused_share = shares["missing"] + shares["merged"]
    print(
        f"\ngrounding (timesteps 200, 500; {args.scenes} scenes): best mIoU {gr['best_miou']:.3f}, AUROC "
        f"{gr['auroc']:.3f}, correlation between phrases' maps {gr['map_correlation']:.3f} ({gr['num_pairs']} pairs), "
        f"specificity {gr['specificity']:.3f} ({2 * gr['num_pairs']} ordered pairs)"
    )
    # The CI resamples images (one image's pairs share its noise and layout; a binomial SE over pairs would be
    # optimistic). Results written before it existed have none: re-run the grounding step.
    spec, (lo, hi) = gr["specificity"], gr["specificity_ci95"]
    single = objects["single_object_accuracy"]
    print("\nissue #20's criteria:")
    print(f"  single-object prompts right >= 95%: {single:.1f}% -> {'yes' if single >= 95 else 'no'}")
    print(
        f"  multi-object failures dominantly missing or merged: {100 * fused_share:.0f}% of failures "
        f"(dominant single kind: {multi.get('dominant_failure')}) -> {'yes' if fused_share > 0.5 else 'no'}"
    )
    print(f"  attention at >= 16x16: {sizes[0]}x{sizes[0]} -> {'yes' if sizes[0] >= 16 else 'no'}")
    print(
        f"  per-token maps differ, each on its own object: specificity {spec:.3f} [{lo:.3f}, {hi:.3f}] (95% CI, "
        f"bootstrap over images) vs chance 0.5 -> {'yes' if lo > 0.5 else 'no'}"
    )
    record = {"model": model, "world": world, "attention_sizes": sizes, "seconds": round(seconds, 1),
              "objects": objects,
              "grounding": {k: gr[k] for k in ("best_miou", "auroc", "map_correlation", "specificity",
                                               "specificity_ci95", "num_pairs")},
              "prompts": args.prompts, "images_per_prompt": args.images, "scenes": args.scenes}  # fmt: skip
    (out / "card.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
