"""The shapes-world base model: a small Stable-Diffusion-architecture pipeline trained from scratch.

``arch`` defines the parts (AutoencoderKL, CLIPTextModel with the real CLIP tokenizer, a
UNet2DConditionModel with cross-attention at three resolutions); ``recipe`` trains them -- the VAE
first, then text encoder + UNet with the denoising loss only -- and exports a diffusers folder.
"""
