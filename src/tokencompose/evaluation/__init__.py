"""Evaluation: MultiGen (prompts, generation, detectors, scoring, results) and attention grounding.

Modules import heavy libraries (torch, diffusers, transformers) lazily; the scoring core is numpy only.
"""
