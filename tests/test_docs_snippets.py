"""The stock-loading snippets of docs/stock_loading.md run as written, on tiny models standing in for the paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tokencompose.cli import main
from tokencompose.families import get_family
from tokencompose.models import load_components
from tokencompose.train.lora import add_lora, save_lora

DOC = Path(__file__).resolve().parents[1] / "docs" / "stock_loading.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def paths(model_dir: Path, tmp_path_factory) -> dict[str, str]:
    """Every path the page names, made real with the tiny model."""
    root = tmp_path_factory.mktemp("docs")
    full = root / "full"
    unet = load_components(model_dir).unet
    unet.save_pretrained(full / "unet")
    lora_unet = load_components(model_dir).unet
    add_lora(lora_unet, rank=2, alpha=4.0, target_modules=["to_q", "to_v"])
    save_lora(lora_unet, root / "lora", get_family("sd"))
    assert main(["export", "--model", str(model_dir), "--checkpoint", str(full), "--out", str(root / "exp")]) == 0
    kept = root / "kept"
    assert main(["export", "--model", str(model_dir), "--checkpoint", str(root / "lora"), "--out", str(kept),
                 "--keep-lora"]) == 0  # fmt: skip
    return {
        "CompVis/stable-diffusion-v1-4": str(model_dir),
        "exported/sd14_tc": str(root / "exp"),
        "exported/shapes_lora_kept": str(kept),
        "runs/sd14_coco/checkpoints/step-00024000": str(full),
        "runs/shapes_lora/checkpoints/step-00000200": str(root / "lora"),
    }


def test_the_page_has_the_snippets() -> None:
    assert len(_blocks()) == 5


def test_snippets_run_with_stock_diffusers(paths: dict[str, str]) -> None:
    """All blocks in one fresh interpreter (one import of diffusers), each in its own namespace."""
    blocks = []
    for code in _blocks():
        for name, real in paths.items():
            code = code.replace(f'"{name}', f'"{real}')
        code = code.replace("num_inference_steps=25", "num_inference_steps=2")
        if "shapes_base" not in code:
            code = code.replace(").images[0]", ", height=32, width=32).images[0]")
        blocks.append(code + "\nassert image.size[0] > 0\n")
    program = "\n".join(
        ["import sys", f"blocks = {blocks!r}", "for block in blocks:", "    exec(block, {})",
         "assert not any(m.startswith('tokencompose.') for m in sys.modules), 'a snippet imported tokencompose'",
         "print('ok', len(blocks))"]
    )  # fmt: skip
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok 5", done.stderr[-3000:]
