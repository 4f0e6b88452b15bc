"""What the CLI prints: log lines that do not break progress bars, quiet model loading, and the one formatter
of a number that may be missing (``n/a``) that result lines, tables and figures share.

Library code only logs (``logging.getLogger(__name__)``) and draws its own tqdm bars; the CLI calls
:func:`setup_console` once, so users of the library keep their own logging set-up.
"""

from __future__ import annotations

import logging
import sys


class TqdmLoggingHandler(logging.Handler):
    """Writes each record through ``tqdm.write``: a log line lands above an active bar instead of inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def number(value: float | None, spec: str = ".3f", missing: str = "n/a") -> str:
    """``value`` in ``spec`` (the format mini-language: ``".3f"``, ``".1%"``), or ``missing`` where there is none
    (a metric undefined on this input: no pairs, no phrases)."""
    return missing if value is None else format(value, spec)


def quiet_model_loading() -> None:
    """Silence transformers' per-model "Loading weights" bars and diffusers' "Loading pipeline components".

    A run loads a dozen models (17 bars in ``demo --smoke``); they bury the bars that track real work.
    Hub downloads keep their bars: transformers' switch also turns off huggingface_hub's, so it is turned
    back on.
    """
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import diffusers

        diffusers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import enable_progress_bars

        enable_progress_bars()
    except ImportError:
        pass


def setup_console(verbose: bool = False) -> None:
    """Root logging through :class:`TqdmLoggingHandler`: INFO, or DEBUG with ``verbose``."""
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
