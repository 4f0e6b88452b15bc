"""Saved model folders load under every transformers release we support, not only the one that wrote them.

transformers 5 writes CLIP text encoders with flat keys and tokenizers as a single ``tokenizer.json``;
transformers 4 (what many diffusers set-ups still run) reads ``text_model.*`` keys and
``vocab.json`` + ``merges.txt``, and loads flat keys as a *random* encoder with only a warning.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tokencompose.models import load_components, tiny_components
from tokencompose.tokens import input_ids


def _keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


def check_portable(folder: Path) -> None:
    """Text-encoder keys in the hub layout and the BPE's two files beside ``tokenizer.json``."""
    keys = _keys(folder / "text_encoder")
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    tok = folder / "tokenizer"
    vocab = json.loads((tok / "vocab.json").read_text())
    merges = (tok / "merges.txt").read_text().splitlines()
    assert len(vocab) == 49408 and merges[0].startswith("#version") and merges[1] == "i n"


def test_saved_components_are_portable_and_round_trip(tmp_path: Path) -> None:
    comps = tiny_components()
    comps.save(tmp_path)
    check_portable(tmp_path)
    back = load_components(tmp_path)
    ids = input_ids(comps.tokenizer, ["a red circle"])
    assert torch.equal(input_ids(back.tokenizer, ["a red circle"]), ids)
    with torch.no_grad():
        assert torch.equal(back.text_encoder(ids)[0], comps.text_encoder(ids)[0])


def test_saved_text_encoder_config_says_float32_whatever_the_stored_precision(tiny, tmp_path) -> None:
    """Half weights on disk still load as float32 beside diffusers' float32 UNet (stock, no dtype)."""
    import copy
    import json

    from transformers import CLIPTextModel

    from tokencompose.models import save_text_encoder

    save_text_encoder(copy.deepcopy(tiny.text_encoder).half(), tmp_path / "te")
    config = json.loads((tmp_path / "te" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert CLIPTextModel.from_pretrained(tmp_path / "te").dtype == torch.float32
