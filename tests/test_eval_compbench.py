"""T2I-CompBench (BLIP-VQA attribute binding, CLIP non-spatial) and CLIP score: rules and commands, offline.

Tiny random BLIP-VQA and CLIP folders (:mod:`tokencompose.evaluation.tiny_scorers`) and the tiny SD pipeline
of ``conftest.model_dir``: the scores mean nothing, the rules and the code path are checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokencompose.errors import UserError
from tokencompose.evaluation.clip_score import ClipScorer, ClipSettings, clip_s, pixels, summary
from tokencompose.evaluation.compbench import (
    BlipVqaScorer,
    VqaSettings,
    binding_score,
    blip_question,
    load_spacy,
    prompt_questions,
)

GEN = ["--steps", "2", "--resolution", "64", "--images-per-prompt", "2", "--device", "cpu", "--batch-size", "4"]
COLOR = ["a green bench and a blue bowl", "a red cat"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tokencompose.evaluation.tiny_scorers import save_tiny_blip_vqa, save_tiny_clip

    root = tmp_path_factory.mktemp("scorers")
    return save_tiny_blip_vqa(root / "blip"), save_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def nlp():
    pytest.importorskip("spacy")
    try:
        return load_spacy()
    except UserError as err:
        pytest.skip(str(err))


def cli(argv: list[str]) -> int:
    from tokencompose.commands import eval_compbench

    parser = argparse.ArgumentParser()
    eval_compbench.add_parser(parser.add_subparsers(dest="evaluation", required=True))
    return eval_compbench.run(parser.parse_args(argv))


def images(n: int, seed: int = 0, size: tuple[int, int] = (40, 56)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


# --- rules on hand-built answers ---------------------------------------------------------------------------


def test_question_is_phrase_with_mark_after_blip_pre_question() -> None:
    assert blip_question("A Green Bench") == "a green bench?"
    assert blip_question('the "big" (red) dog.') == "the big red dog?"  # .!"()*#:; dropped, '?' kept
    assert blip_question(" ".join(["w"] * 60)).split(" ") == ["w"] * 50  # at most 50 words


def test_binding_score_is_product_of_rounded_answers() -> None:
    assert binding_score([0.5, 0.25], decimals=None) == 0.125
    assert binding_score([], decimals=4) == 1.0  # no phrase: T2I-CompBench's missing answers are 1
    yes = [0.123456, 0.987654, 0.5]
    want = float("{:.4f}".format(np.prod([float(f"{p:.4f}") for p in yes])))  # the reference's string rounding
    assert binding_score(yes, decimals=4) == pytest.approx(want, abs=1e-12)
    assert binding_score(yes, decimals=None) == pytest.approx(float(np.prod(yes)))
    assert binding_score(yes, decimals=4) != binding_score(yes, decimals=None)


def test_noun_chunks_in_order_capped(nlp) -> None:
    qs = prompt_questions(["a green bench and a blue bowl", "A Fluffy towel and a metallic spoon"], nlp)
    assert qs == [["a green bench?", "a blue bowl?"], ["a fluffy towel?", "a metallic spoon?"]]
    assert prompt_questions(["a green bench and a blue bowl"], nlp, max_phrases=1) == [["a green bench?"]]


def test_summary_and_clip_s() -> None:
    v = [0.2, 0.4, 0.9]
    s = summary(v)
    assert s["mean"] == pytest.approx(np.mean(v)) and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert s["num_images"] == 3 and summary([0.3])["std"] == 0.0
    with pytest.raises(UserError):
        summary([])
    cos = torch.tensor([-0.2, 0.0, 0.3])
    assert clip_s(cos).tolist() == pytest.approx([0.0, 0.0, 0.75])  # 2.5 * max(cos, 0)
    assert clip_s(cos, 100.0).tolist() == pytest.approx([0.0, 0.0, 30.0])


def test_pixels_match_torchvision_resize_crop() -> None:
    from torchvision import transforms

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for crop, resize in ((24, 24), (None, (30, 30))):
        steps = [transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC)]
        steps += [transforms.CenterCrop(crop)] if crop else []
        ref = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(mean, std)])
        ims = images(2)
        want = torch.stack([ref(im) for im in ims])
        assert torch.allclose(pixels(ims, resize, crop, mean, std), want, atol=1e-5)


# --- the scorers' model calls -------------------------------------------------------------------------------


def test_blip_yes_probability_batched_as_alone(scorers: tuple[Path, Path]) -> None:
    scorer = BlipVqaScorer(VqaSettings(model=str(scorers[0]), image_size=48, batch_size=3))
    tok = scorer.processor.tokenizer
    assert scorer.enc_id == tok.convert_tokens_to_ids("[ENC]") and scorer.start_id == tok.bos_token_id
    ims = images(3)
    qs = [["a red cat?", "a blue bowl?"], [], ["a green bench?"]]
    together = scorer.yes_probability(ims, qs)
    alone = [scorer.yes_probability([im], [q])[0] for im, q in zip(ims, qs, strict=True)]
    assert [len(x) for x in together] == [2, 0, 1]
    assert np.allclose(sum(together, []), sum(alone, []), atol=1e-5)
    assert all(0.0 < p < 1.0 for p in sum(together, []))
    assert len({round(p, 6) for p in sum(together, [])}) == 3  # the answers depend on image and question
    # The answer is the first answer token's p(yes) / (p(yes) + p(no)), from the full softmax.
    px = pixels(ims[:1], (48, 48), None, scorer.mean, scorer.std)
    m = scorer.model
    with torch.no_grad():
        emb = m.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
        ids = tok(["a red cat?"], return_tensors="pt")["input_ids"]
        ids[:, 0] = scorer.enc_id
        states = m.text_encoder(input_ids=ids, encoder_hidden_states=emb).last_hidden_state
        logits = m.text_decoder(input_ids=torch.tensor([[scorer.start_id]]), encoder_hidden_states=states).logits
        p = torch.softmax(logits[0, 0].float(), -1)
        want = p[tok.convert_tokens_to_ids("yes")] / (
            p[tok.convert_tokens_to_ids("yes")] + p[tok.convert_tokens_to_ids("no")]
        )
    assert together[0][0] == pytest.approx(float(want), abs=1e-6)


def test_clip_cosine_matches_model_logits(scorers: tuple[Path, Path]) -> None:
    scorer = ClipScorer(ClipSettings(model=str(scorers[1]), batch_size=2))
    ims, texts = images(3, seed=1), ["a red cat", "a dog on a bench", "a cup"]
    cos = scorer.cosine(ims, texts)
    px = pixels(ims, scorer.resize, scorer.crop, scorer.mean, scorer.std)
    tok = scorer.processor.tokenizer(texts, padding=True, return_tensors="pt")
    out = scorer.model(pixel_values=px, **tok)
    want = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()
    assert torch.allclose(cos, want.float(), atol=1e-5)


# --- the commands end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compbench_run(model_dir: Path, scorers: tuple[Path, Path], nlp, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cb")
    prompts = root / "dataset"
    prompts.mkdir()
    (prompts / "color_val.txt").write_text("\n".join(COLOR) + "\n")
    (prompts / "shape_val.txt").write_text("a round cup\n")
    (prompts / "non_spatial_val.txt").write_text("a dog is playing with a ball\n")
    argv = ["compbench", "--model", str(model_dir), "--prompt-dir", str(prompts), "--out", str(root / "out")]
    argv += ["--categories", "color,shape,non_spatial", "--vqa-model", str(scorers[0]), "--clip-model", str(scorers[1])]
    argv += ["--vqa-image-size", "48", "--name", "tiny"]
    assert cli(argv + GEN) == 0
    return root, argv


def test_compbench_generates_and_scores(compbench_run) -> None:
    root, _ = compbench_run
    out = root / "out"
    res = json.loads((out / "results.json").read_text())
    assert (
        res["kind"] == "compbench" and res["name"] == "tiny" and set(res["scores"]) == {"color", "shape", "non_spatial"}
    )
    assert res["scores"]["color"]["num_images"] == 4 and res["scores"]["color"]["num_prompts"] == 2
    color_file = root / "dataset" / "color_val.txt"
    assert res["prompts"]["files"]["color"]["sha256"] == hashlib.sha256(color_file.read_bytes()).hexdigest()
    assert res["scorers"]["blip_vqa"]["image_size"] == 48 and res["scorers"]["clip"]["id"].endswith("clip")
    assert res["generation"]["color"]["steps"] == 2 and res["model"]["base"]
    per = json.loads((out / "per_image.json").read_text())
    assert len(list((out / "images" / "color").glob("*.png"))) == 4
    first = per["color"][0]
    assert first["prompt"] == COLOR[0] and first["questions"] == ["a green bench?", "a blue bowl?"]
    assert first["score"] == binding_score(first["yes"], 4)
    for cat in ("color", "non_spatial"):
        values = [r["score"] for r in per[cat]]
        assert res["scores"][cat]["mean"] == pytest.approx(np.mean(values))
        assert res["scores"][cat]["std"] == pytest.approx(np.std(values, ddof=1) if len(values) > 1 else 0.0)
    assert all(-1.0 <= r["score"] <= 1.0 for r in per["non_spatial"])  # the raw cosine, unscaled


def test_compbench_scores_existing_images_without_model(compbench_run, scorers: tuple[Path, Path]) -> None:
    root, argv = compbench_run
    prompt_dir = ["--prompt-dir", str(root / "dataset")]
    old = json.loads((root / "out" / "results.json").read_text())
    argv2 = ["compbench", "--images", str(root / "out" / "images"), "--out", str(root / "again")]
    argv2 += prompt_dir + argv[argv.index("--categories") :]
    assert cli(argv2 + ["--images-per-prompt", "2", "--device", "cpu"]) == 0
    res = json.loads((root / "again" / "results.json").read_text())
    assert res["model"] is None
    for cat in old["scores"]:
        assert res["scores"][cat]["mean"] == pytest.approx(old["scores"][cat]["mean"], abs=1e-6)
    # Images made from other prompts are refused: the color folder scored as the shape prompts.
    wrong = root / "wrong"
    (wrong / "shape").mkdir(parents=True)
    for f in (root / "out" / "images" / "color").glob("0_*.png"):
        (wrong / "shape" / f.name).write_bytes(f.read_bytes())
    bad = ["compbench", "--images", str(wrong), "--out", str(root / "bad"), *prompt_dir, "--categories", "shape"]
    with pytest.raises(UserError, match="another prompt"):
        cli(bad + ["--vqa-model", str(scorers[0]), "--images-per-prompt", "2", "--device", "cpu"])


def test_compbench_two_launched_processes_score_like_one(compbench_run) -> None:
    """Under torchrun each process answers the questions of every other image; process 0 merges in order."""
    from train_util import torchrun_cli

    root, argv = compbench_run
    two = root / "two"
    torchrun_cli(["evaluate", "compbench", "--images", str(root / "out" / "images"), "--out", str(two),
                  "--prompt-dir", str(root / "dataset"), *argv[argv.index("--categories") :],
                  "--images-per-prompt", "2", "--device", "cpu", "--vqa-batch-size", "1"])  # fmt: skip
    res, one = json.loads((two / "results.json").read_text()), json.loads((root / "out" / "results.json").read_text())
    assert res["processes"] == 2 and one["processes"] == 1
    per2, per1 = (
        json.loads((two / "per_image.json").read_text()),
        json.loads((root / "out" / "per_image.json").read_text()),
    )
    assert set(per2) == set(per1)
    for cat in per1:
        assert [(r["image"], r["prompt"]) for r in per2[cat]] == [(r["image"], r["prompt"]) for r in per1[cat]]
        assert [r["score"] for r in per2[cat]] == pytest.approx([r["score"] for r in per1[cat]], abs=2e-4)
        assert res["scores"][cat]["mean"] == pytest.approx(one["scores"][cat]["mean"], abs=2e-4)
    assert not any((two / "parts").iterdir())


def test_compbench_refuses_bad_requests(tmp_path: Path) -> None:
    (tmp_path / "color_val.txt").write_text("a red cat\n")
    base = ["compbench", "--prompt-dir", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(UserError, match="unknown T2I-CompBench categories"):
        cli(base + ["--categories", "colour"])
    with pytest.raises(UserError, match="does not exist"):
        cli(base + ["--categories", "texture"])  # no texture_val.txt
    with pytest.raises(UserError, match="images missing"):
        (tmp_path / "imgs" / "color").mkdir(parents=True)
        cli(base + ["--categories", "color", "--images", str(tmp_path / "imgs"), "--device", "cpu"])


def test_clipscore_generates_and_rescores(model_dir: Path, scorers: tuple[Path, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n\na dog on a bench\n")  # blank lines skipped: ids 0, 1
    argv = ["clipscore", "--prompt-file", str(prompts), "--clip-model", str(scorers[1])]
    assert cli(argv + ["--model", str(model_dir), "--out", str(tmp_path / "o")] + GEN) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["kind"] == "clipscore" and res["weight"] == 2.5 and res["scores"]["cosine"]["num_images"] == 4
    assert sorted(p.name for p in (tmp_path / "o" / "images").glob("*.png")) == [
        "0_0.png",
        "0_1.png",
        "1_0.png",
        "1_1.png",
    ]
    per = json.loads((tmp_path / "o" / "per_image.json").read_text())
    assert res["scores"]["clip_score"]["mean"] == pytest.approx(np.mean([2.5 * max(r["cosine"], 0) for r in per]))
    assert res["prompts"]["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    again = ["--images", str(tmp_path / "o" / "images"), "--out", str(tmp_path / "r"), "--weight", "100"]
    assert cli(argv + again + ["--images-per-prompt", "2", "--device", "cpu"]) == 0
    res2 = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res2["scores"]["cosine"]["mean"] == pytest.approx(res["scores"]["cosine"]["mean"], abs=1e-6)
    assert res2["scores"]["clip_score"]["mean"] == pytest.approx(res["scores"]["clip_score"]["mean"] * 40, rel=1e-5)


def test_clipscore_launched_processes_score_their_shards_like_one(model_dir, scorers, tmp_path, monkeypatch) -> None:
    """Three launched processes (played in turn) each score every third image; process 0's rows equal one's."""
    from tokencompose.evaluation.clip_score import ClipScoreSettings, run_clipscore
    from tokencompose.typed_data import load_settings
    from train_util import play_launch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog on a bench\n")
    common = {"prompt_file": str(prompts), "clip": {"model": str(scorers[1])}, "generation": {"images_per_prompt": 2}}
    gen = {"model": {"model": str(model_dir), "device": "cpu"}, "generation": {"steps": 2, "resolution": 64,
           "images_per_prompt": 2}}  # fmt: skip
    one = run_clipscore(load_settings(ClipScoreSettings, {**common, **gen, "out": str(tmp_path / "one")}))
    given = {**common, "images": str(tmp_path / "one" / "images"), "out": str(tmp_path / "three")}
    results = play_launch(monkeypatch, 3, lambda: run_clipscore(load_settings(ClipScoreSettings, given)))
    assert results[1] == {} and results[2] == {} and results[0]["processes"] == 3
    per1 = json.loads((tmp_path / "one" / "per_image.json").read_text())
    per3 = json.loads((tmp_path / "three" / "per_image.json").read_text())
    assert [r["image"] for r in per3] == [r["image"] for r in per1] == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    assert [r["cosine"] for r in per3] == pytest.approx([r["cosine"] for r in per1], abs=1e-6)
    assert results[0]["scores"]["cosine"]["mean"] == pytest.approx(one["scores"]["cosine"]["mean"], abs=1e-6)
