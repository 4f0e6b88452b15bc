"""Tiny random-init image-text scorers of the real classes, saved as loadable folders: offline tests of scoring.

A BLIP VQA model (``BlipForQuestionAnswering`` + ``BlipProcessor``, a BERT word-piece vocabulary built from a
word list, with BLIP's ``[DEC]`` / ``[ENC]`` tokens after it as in BLIP's own tokenizer) and a CLIP model
(``CLIPModel`` + ``CLIPProcessor`` with the CLIP BPE tokenizer shipped in this package). The weights are
random, so the scores mean nothing; the code path (folder loading, processor, model calls) is the one the
real checkpoints (``Salesforce/blip-vqa-base``, ``openai/clip-vit-base-patch32``) take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokencompose.models import clip_tokenizer

TINY_VQA_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", ".", ",", "a", "an", "the", "and", "of", "yes", "no",
    "red", "green", "blue", "black", "white", "wooden", "metallic", "round", "square", "oval",
    "cat", "dog", "bench", "bowl", "cake", "horse", "vase", "car", "cup", "book", "table", "circle", "triangle",
]  # fmt: skip


def save_tiny_blip_vqa(path: str | Path, seed: int = 0, image_size: int = 32, words: list[str] | None = None) -> Path:
    """A tiny BLIP VQA model + processor in ``path`` (vision patch 16, so ``image_size // 16`` patches a side).

    The vocabulary is ``words`` then ``[DEC]`` (the decoder's start token, BLIP's ``bos_token``) and ``[ENC]``
    (the question encoder's first token), in that order, as BLIP's ``init_tokenizer`` appends them to BERT's.
    """
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = list(words or TINY_VQA_WORDS) + ["[DEC]", "[ENC]"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), bos_token="[DEC]", additional_special_tokens=["[ENC]"])
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=vocab.index("[PAD]"),
        bos_token_id=vocab.index("[DEC]"),
        sep_token_id=vocab.index("[SEP]"),
        initializer_range=0.5,  # wide random weights: answers that differ from image to image and question to question
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
        patch_size=16, initializer_range=0.5,
    )  # fmt: skip
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    ip = BlipImageProcessor(size={"height": image_size, "width": image_size})
    model.save_pretrained(path)
    BlipProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return path


def save_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIP model + processor in ``path`` (CLIP's BPE vocabulary, 77 text positions, patch 16)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    text = dict(common, vocab_size=49408, max_position_embeddings=77)
    vision = dict(common, image_size=image_size, patch_size=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    path = Path(path)
    model.save_pretrained(path)
    CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer()).save_pretrained(path)
    return path
