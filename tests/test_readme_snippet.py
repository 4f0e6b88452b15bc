"""The README's library snippet runs as written on tiny models, and re-indexes the masks of dropped phrases."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _library_block() -> str:
    """The first python block of the README's "The library" section."""
    section = README.read_text().split("## The library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_library_snippet_runs_and_keeps_masks_with_their_phrases(tiny):
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle and a blue square", "a green triangle"]
    # "zebra" and "cat" are not in their captions: dropped, so the masks after them must move up.
    phrases = [["zebra", "red circle", "blue square"], ["green triangle", "cat"]]
    image_masks = [torch.rand(3, 64, 64, generator=g) > 0.5, torch.rand(2, 64, 64, generator=g) > 0.5]
    ids = tiny.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        text_embeddings = tiny.text_encoder(ids.input_ids).last_hidden_state
    names = {
        "tokenizer": tiny.tokenizer,
        "unet": tiny.unet,
        "captions": captions,
        "phrases": phrases,
        "image_masks": image_masks,
        "text_embeddings": text_embeddings,
        "noisy_latents": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([10, 500]),
        "noise": torch.randn(2, 4, 8, 8, generator=g),
    }
    exec(compile(_library_block(), str(README), "exec"), names)  # noqa: S102 -- the README's own code

    pt, phrase_masks, loss = names["pt"], names["phrase_masks"], names["loss"]
    assert pt.kept == [[1, 2], [0]]
    assert phrase_masks.shape == (2, 2, 64, 64)
    assert torch.equal(phrase_masks[0], image_masks[0][[1, 2]])  # "red circle", "blue square"
    assert torch.equal(phrase_masks[1, 0], image_masks[1][0]) and not phrase_masks[1, 1].any()  # padding slot
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
