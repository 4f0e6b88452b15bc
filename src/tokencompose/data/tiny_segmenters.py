"""Tiny random-init segmenters of the real classes, saved as loadable folders: offline tests of the SAM path.

The weights are random, so the masks mean nothing; the code path (processor, image encoder, prompt encoder,
mask decoder, post-processing, folder loading) is the one real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

# "sam2_video" is the layout of the hub's SAM 2.1 checkpoints (Sam2VideoModel + Sam2VideoProcessor), which
# the segmenters load as a SAM 2 image model.
TINY_SAM_KINDS = ("sam", "sam_hq", "sam2", "sam2_video")
_NEEDS = {"sam": "SamModel", "sam_hq": "SamHQModel", "sam2": "Sam2Model", "sam2_video": "Sam2VideoModel"}


def tiny_sam_kinds() -> tuple[str, ...]:
    """The kinds :func:`save_tiny_sam` can build with the installed transformers (SAM-HQ needs 4.52, SAM 2 4.56)."""
    import transformers

    return tuple(k for k in TINY_SAM_KINDS if hasattr(transformers, _NEEDS[k]))


def save_tiny_sam(path: str | Path, kind: str = "sam", seed: int = 0, image_size: int = 64) -> Path:
    """A tiny ``kind`` model + processor in ``path``, for ``image_size`` inputs.

    ``kind``: ``sam`` | ``sam_hq`` | ``sam2`` | ``sam2_video`` (the hub's SAM 2.1 layout, same image path).
    One ViT layer (SAM / SAM-HQ) or five Hiera blocks (SAM 2), hidden sizes 8-32, 16-pixel patches of the
    image embedding. ``image_size`` must be a multiple of 16 (SAM 2: of 32).
    """
    if kind not in TINY_SAM_KINDS:
        raise ValueError(f"unknown tiny SAM kind {kind!r}; known: {', '.join(TINY_SAM_KINDS)}")
    if kind not in tiny_sam_kinds():
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no {kind} model")
    torch.manual_seed(seed)
    model, processor = (_tiny_sam2 if kind.startswith("sam2") else _tiny_sam)(kind, image_size)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _tiny_sam(kind: str, image_size: int):
    import transformers

    hq = kind == "sam_hq"
    prefix = "SamHQ" if hq else "Sam"
    embed = image_size // 16  # side of the image embedding
    vision = getattr(transformers, f"{prefix}VisionConfig")(
        hidden_size=32,
        output_channels=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        mlp_dim=64,
        image_size=image_size,
        patch_size=16,
        window_size=0,
        global_attn_indexes=[0],  # SAM-HQ takes its early ViT features from the global-attention layers
        num_pos_feats=16,
    )
    prompt = getattr(transformers, f"{prefix}PromptEncoderConfig")(
        hidden_size=32, image_size=image_size, patch_size=16, mask_input_channels=4
    )
    decoder_kw = dict(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=32)
    if hq:
        decoder_kw["vit_dim"] = 32
    decoder = getattr(transformers, f"{prefix}MaskDecoderConfig")(**decoder_kw)
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    model = getattr(transformers, f"{prefix}Model")(config)
    ip = transformers.SamImageProcessor(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": 4 * embed},
        mask_pad_size={"height": 4 * embed, "width": 4 * embed},
    )
    return model, getattr(transformers, f"{prefix}Processor")(image_processor=ip)


def _tiny_sam2(kind: str, image_size: int):
    import transformers
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    dims = [8, 16, 24, 32]  # must grow at every query-pool stage (the residual is only pooled with a projection)
    side = image_size // 4  # Hiera's patch stride
    backbone = Sam2HieraDetConfig(
        hidden_size=dims[0],
        image_size=[image_size, image_size],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=dims,
        num_attention_heads_per_stage=[1, 1, 2, 2],
        global_attention_blocks=[3],  # inside stage 3 as in the real ones (not on a query-pool block)
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=dims[::-1],
        backbone_feature_sizes=[[side, side], [side // 2, side // 2], [side // 4, side // 4]],
        fpn_hidden_size=32,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(
        hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=32
    )
    if kind == "sam2_video":
        return _tiny_sam2_video(vision, prompt, decoder, image_size)
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    model = Sam2Model(config)
    # 4.x has only the fast (torchvision) image processor, named so; 5.x renamed it
    image_processor = getattr(transformers, "Sam2ImageProcessor", None) or transformers.Sam2ImageProcessorFast
    ip = image_processor(size={"height": image_size, "width": image_size}, mask_size={"height": side, "width": side})
    return model, Sam2Processor(image_processor=ip, target_size=image_size)


def _tiny_sam2_video(vision, prompt, decoder, image_size: int):
    import transformers

    config = transformers.Sam2VideoConfig(
        vision_config=vision.to_dict(),
        prompt_encoder_config=prompt.to_dict(),
        mask_decoder_config=decoder.to_dict(),
        image_size=image_size,
        memory_attention_hidden_size=32,
        memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64,
        memory_encoder_hidden_size=32,
        memory_encoder_output_channels=16,
        mask_downsampler_embed_dim=32,
        memory_fuser_embed_dim=32,
        memory_fuser_intermediate_dim=64,
    )
    model = transformers.Sam2VideoModel(config)
    image_processor = getattr(transformers, "Sam2ImageProcessor", None) or transformers.Sam2ImageProcessorFast
    side = image_size // 4
    ip = image_processor(size={"height": image_size, "width": image_size}, mask_size={"height": side, "width": side})
    vp = transformers.Sam2VideoVideoProcessor(size={"height": image_size, "width": image_size})
    return model, transformers.Sam2VideoProcessor(image_processor=ip, video_processor=vp, target_size=image_size)
