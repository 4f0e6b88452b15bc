"""tokencompose: token-level supervision of text-to-image diffusion (TokenCompose, CVPR 2024)."""

__version__ = "0.1.0"
