"""Tiny random-init detectors of the real classes, saved as loadable folders: offline tests of the detector path.

The weights are random, so the detections mean nothing; the code path (processor, model, post-processing,
folder loading) is the one real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tokencompose.models import clip_tokenizer


def save_tiny_owl(path: str | Path, version: int = 2, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny OWLv2 (``version=2``) or OWL-ViT (``version=1``) model + processor in ``path``."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1)
    text = dict(common, vocab_size=49408, max_position_embeddings=16)
    vision = dict(common, image_size=image_size, patch_size=16)
    tok = clip_tokenizer()
    tok.model_max_length = 16  # OWL's text length
    if version == 2:
        model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
        ip = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
        proc = Owlv2Processor(image_processor=ip, tokenizer=tok)
    else:
        model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
        ip = OwlViTImageProcessor(
            size={"height": image_size, "width": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        proc = OwlViTProcessor(image_processor=ip, tokenizer=tok)
    path = Path(path)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return path


TINY_BERT_WORDS = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "a", "an", "photo", "of", "and",
    "cat", "dog", "cup", "book", "kite", "wine", "glass", "red", "green", "blue", "circle", "square", "triangle",
]  # fmt: skip


def save_tiny_grounding_dino(
    path: str | Path, seed: int = 0, image_size: int = 64, max_text_len: int = 64, words: list[str] | None = None
) -> Path:
    """A tiny Grounding DINO model + processor (BERT word-piece vocabulary of ``words``) in ``path``."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = list(words or TINY_BERT_WORDS)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(path / "vocab.txt"), model_max_length=max_text_len)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=16,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            image_size=image_size,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_text_len,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # transformers ties the box heads of layers >= 1 to layer 0: needs two
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=10,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=max_text_len,
    )
    model = GroundingDinoForObjectDetection(config)
    ip = GroundingDinoImageProcessor(size={"shortest_edge": image_size, "longest_edge": image_size})
    GroundingDinoProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    model.save_pretrained(path)
    return path
