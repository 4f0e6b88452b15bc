"""Figures of TokenCompose models: per-word attention, masks vs attention, image grids, loss curves, HTML report.

``aggregate`` is pure (tensors); ``figures`` renders with matplotlib, imported lazily; ``capture`` runs
models; ``make`` ties them into one function per figure (loss curves reuse ``tokencompose.train.curves``);
``report`` writes the self-contained HTML page.
"""
