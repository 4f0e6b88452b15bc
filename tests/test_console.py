"""The CLI's console: model-loading bars silenced, log lines written above progress bars."""

from __future__ import annotations

import logging
from pathlib import Path

from tokencompose.cli import main


def _enable_bars() -> None:
    import diffusers
    import transformers

    transformers.utils.logging.enable_progress_bar()
    diffusers.utils.logging.enable_progress_bar()


def test_model_loading_bars_are_silenced_by_the_cli(model_dir: Path, tmp_path: Path, capfd) -> None:
    from diffusers import DiffusionPipeline

    _enable_bars()
    capfd.readouterr()
    DiffusionPipeline.from_pretrained(str(model_dir))  # control: the library alone draws its bars
    assert "Loading" in capfd.readouterr().err
    assert main(["export", "--model", str(model_dir), "--out", str(tmp_path / "x")]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Loading pipeline components" not in err
    from huggingface_hub.utils import are_progress_bars_disabled

    assert not are_progress_bars_disabled()  # downloads keep their bars
    _enable_bars()


def test_log_lines_go_through_tqdm_write(monkeypatch) -> None:
    from tqdm import tqdm

    from tokencompose.console import TqdmLoggingHandler

    written: list[str] = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tokencompose.test_console")
    logger.addHandler(handler)
    try:
        logger.warning("dropped %d phrases", 3)
    finally:
        logger.removeHandler(handler)
    assert written == ["WARNING dropped 3 phrases"]
