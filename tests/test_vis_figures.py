"""Rendering: panel counts, deterministic PNG bytes, colour bar, no version metadata, lazy matplotlib."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tokencompose.visualize import figures


def _image(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _maps(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size)).astype(np.float32)


def _visible_image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def test_attention_figure_one_panel_per_word_plus_image_and_colorbar():
    fig = figures.attention_figure(_image(), ["cat", "bottle", "table"], _maps(3), title="a cat")
    panels = _visible_image_axes(fig)
    assert len(panels) == 4
    assert [ax.get_title() for ax in panels] == ["image", "cat", "bottle", "table"]
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 1
    assert panels[1].images[-1].get_cmap().name == "inferno"


def test_attention_figure_wraps_rows():
    fig = figures.attention_figure(_image(), [f"w{i}" for i in range(8)], _maps(8), ncols=4)
    assert len(_visible_image_axes(fig)) == 9
    hidden = [ax for ax in fig.axes if not ax.get_visible()]
    assert len(hidden) == 3  # 3 rows x 4 cols = 12 slots for 9 panels


def test_png_bytes_deterministic_and_data_dependent():
    a = figures.png_bytes(figures.attention_figure(_image(), ["cat"], _maps(1)), dpi=100)
    b = figures.png_bytes(figures.attention_figure(_image(), ["cat"], _maps(1)), dpi=100)
    c = figures.png_bytes(figures.attention_figure(_image(), ["cat"], _maps(1, seed=1)), dpi=100)
    assert a == b
    assert a != c
    assert a.startswith(b"\x89PNG") and b"matplotlib" not in a.lower()


def test_png_dpi_sets_pixel_size(tmp_path):
    fig = figures.grid_figure({"base": [_image()], "tuned": [_image(1)]}, ["a cat (seed 0)"])
    w_in, h_in = fig.get_size_inches()
    path = figures.save_png(fig, tmp_path / "g.png", dpi=120)
    with Image.open(path) as im:
        assert im.size == (round(w_in * 120), round(h_in * 120))


def test_mask_figure_rows_are_phrases_columns_are_image_mask_models():
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, :16], masks[1, 16:] = True, True
    fig = figures.mask_figure(
        _image(),
        ["cat", "bottle"],
        masks,
        {"base": _maps(2), "tokencompose": _maps(2, 1)},
        scores={"base": [0.25, 0.5], "tokencompose": [0.9, 0.75]},
    )
    panels = _visible_image_axes(fig)
    assert len(panels) == 2 * 4
    assert [ax.get_title() for ax in panels[:4]] == ["image", "mask", "base", "tokencompose"]
    assert panels[0].get_ylabel() == "cat" and panels[4].get_ylabel() == "bottle"
    assert panels[3].get_xlabel() == "in mask 0.90"


def test_grid_figure_models_side_by_side():
    fig = figures.grid_figure(
        {"base": [_image(0), _image(1), _image(2)], "tuned": [_image(3), _image(4), _image(5)]},
        ["p1 (seed 0)", "p1 (seed 1)", "p2 (seed 0)"],
    )
    panels = _visible_image_axes(fig)
    assert len(panels) == 6
    assert panels[0].get_title() == "base" and panels[1].get_title() == "tuned"
    assert panels[2].get_ylabel() == "p1 (seed 1)"


def test_rendered_heatmap_uses_the_colour_map():
    """A hot corner must show inferno's bright yellow, a cold one its dark end (over a grey backdrop)."""
    m = np.zeros((1, 32, 32), dtype=np.float32)
    m[0, :8, :8] = 1.0
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)
    fig = figures.attention_figure(grey, ["x"], m, alpha=1.0)
    png = Image.open(io.BytesIO(figures.png_bytes(fig, dpi=100))).convert("RGB")
    arr = np.asarray(png).astype(int)
    yellowish = (arr[..., 0] > 220) & (arr[..., 1] > 200) & (arr[..., 2] < 140)
    assert yellowish.sum() > 50


def test_matplotlib_is_imported_lazily():
    code = (
        "import sys\n"
        "import tokencompose.visualize.figures, tokencompose.visualize.make, tokencompose.visualize.report\n"
        "import tokencompose.commands.visualize, tokencompose.commands.report, tokencompose.cli\n"
        "tokencompose.cli.build_parser()\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("cmap", ["viridis", "magma"])
def test_colour_map_option(cmap):
    fig = figures.attention_figure(_image(), ["cat"], _maps(1), cmap=cmap)
    assert _visible_image_axes(fig)[1].images[-1].get_cmap().name == cmap
