"""Model parts of a Stable-Diffusion-style pipeline: load from a folder or hub id, or build tiny ones.

A pipeline is held as :class:`Components` (UNet, VAE, text encoder, tokenizer, noise scheduler).
Real checkpoints load from a local folder in diffusers layout (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) or a hub id when the user has network. Tests and the shapes world
build tiny random-init parts of the same classes with :func:`tiny_components` -- no download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from tokencompose.errors import UserError

CLIP_MAX_LENGTH = 77


def looks_like_path(name: str | Path) -> bool:
    """True for a name the user meant as a local path (``/x``, ``./x``, ``~/x``, ``a/b/c``...), not a hub id.

    A hub id is ``name`` or ``org/name``: one slash at most, never leading. So a missing folder is reported
    as a missing folder, not as a malformed repo id.
    """
    text = str(name)
    if text.startswith(("/", ".", "~")) or (os.altsep is not None and os.altsep in text):
        return True
    return text.count(os.sep) > 1 or (os.sep != "/" and os.sep in text)


def hf_dtype(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` keyword for a transformers model's dtype: ``dtype`` from 4.56 on, ``torch_dtype`` before.

    (Older releases pass an unknown ``dtype`` on to the model's ``__init__``, which rejects it; newer
    ones warn on ``torch_dtype``.)
    """
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
    return {key: dtype}


def clip_tokenizer(pad_token: str | None = None) -> Any:
    """The CLIP BPE tokenizer of SD 1.x (same ids), built offline from the files shipped as package data.

    ``pad_token``: SDXL's second tokenizer pads with ``"!"`` instead of the end-of-text token.
    """
    from transformers import CLIPTokenizer

    root = resources.files("tokencompose") / "assets" / "clip_tokenizer"
    kw = {"pad_token": pad_token} if pad_token is not None else {}
    with resources.as_file(root) as folder:
        return CLIPTokenizer(
            str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=CLIP_MAX_LENGTH, **kw
        )


def scale_latents(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> the denoiser's latent space: ``(z - shift_factor) * scaling_factor`` (no shift for SD /
    SDXL, whose configs have none; SD3 and Flux shift)."""
    shift = getattr(vae.config, "shift_factor", None)
    return (z - shift if shift is not None else z) * vae.config.scaling_factor


@dataclass
class Components:
    """The parts of a latent text-to-image diffusion pipeline that training and evaluation need.

    ``family`` names the architecture (:mod:`tokencompose.families`), which says what the parts mean:
    SDXL fills ``text_encoder_2`` / ``tokenizer_2`` (a second CLIP), Flux the same slots with its T5, SD3
    all three (CLIP-L, CLIP-G, T5); SD leaves them None. ``unet`` is the denoiser, whatever
    its class (a UNet, or the SD3 / Flux transformer); a pipeline folder keeps it in the family's subfolder.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    family: str = "sd"

    @property
    def text_encoders(self) -> list[Any]:
        """Every text encoder the family has (frozen in training, moved with the model)."""
        return [e for e in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if e is not None]

    def save(self, path: str | Path) -> None:
        """Write every part in diffusers layout plus the ``model_index.json`` of the family's pipeline class."""
        from tokencompose.families import get_family

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(path / get_family(self.family).denoiser_folder)
        self.vae.save_pretrained(path / "vae")
        for part in get_family(self.family).text_parts:
            value = getattr(self, part)
            (save_tokenizer if part.startswith("tokenizer") else save_text_encoder)(value, path / part)
        self.scheduler.save_pretrained(path / "scheduler")
        write_model_index(path, self)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def save_text_encoder(text_encoder: Any, folder: Path) -> None:
    """``save_pretrained`` in the key layout that every transformers release reads.

    transformers 5 flattened ``CLIPTextModel`` (keys ``embeddings.*``, ``encoder.*``); releases before 5
    expect ``text_model.embeddings.*`` -- the layout of every SD checkpoint on the hub -- and load flat
    keys as a randomly initialised model with only a warning. Release 5 reads both layouts.

    The config always says ``float32`` whatever precision the weights are stored in: transformers 5 loads
    a model in the dtype its config names, diffusers loads the UNet and VAE in float32, and a stock
    ``DiffusionPipeline.from_pretrained(folder)`` with no dtype must not mix half and float.
    """
    import json

    state = None
    if type(text_encoder).__name__ == "CLIPTextModel" and not hasattr(text_encoder, "text_model"):
        state = {f"text_model.{k}": v for k, v in text_encoder.state_dict().items()}
    text_encoder.save_pretrained(folder, state_dict=state)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("dtype", "torch_dtype"):  # transformers 5 / 4 spelling
        if key in config:
            config[key] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, plus the BPE's ``vocab.json`` / ``merges.txt`` when it wrote only ``tokenizer.json``.

    transformers 5 writes the single-file form; transformers 4's ``CLIPTokenizer`` (what diffusers
    loads there) reads the two files. With both, the folder loads under either.
    """
    tokenizer.save_pretrained(folder)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    if not (folder / "vocab.json").exists() and type(model).__name__ == "BPE":
        model.save(str(folder))


def write_model_index(path: Path, comps: Components) -> None:
    import json

    from tokencompose.families import get_family

    (path / "model_index.json").write_text(json.dumps(get_family(comps.family).model_index(comps), indent=2))


def load_components(
    model: str | Path,
    revision: str | None = None,
    unet: str | Path | None = None,
    local_files_only: bool | None = None,
    dtype: torch.dtype = torch.float32,
    family: str = "auto",
) -> Components:
    """Load the parts from a diffusers-layout folder or hub id; ``unet`` optionally overrides the UNet.

    ``unet`` may be a folder holding a diffusers UNet (``config.json`` + weights) or a folder with a
    ``unet/`` subfolder (a checkpoint of ours). Every part is loaded in ``dtype`` (float32 by default,
    whatever precision the files store: our shipped base model stores float16). ``family``: ``auto``
    (read from the folder, :func:`tokencompose.families.detect_family`), ``sd`` or ``sdxl``.
    """
    from diffusers import AutoencoderKL

    from tokencompose.families import resolve_family

    src = str(model)
    is_local = Path(src).expanduser().exists()
    if not is_local and (local_files_only or looks_like_path(model)):
        raise UserError(f"model folder {src} does not exist")
    kw: dict[str, Any] = {"revision": revision} if revision else {}
    fam = resolve_family(family, model, revision)
    if is_local:
        src = str(Path(src).expanduser())
        kw["local_files_only"] = True
        needed = (fam.denoiser_folder, "vae", *fam.text_parts, "scheduler")
        missing = [s for s in needed if not (Path(src) / s).is_dir()]
        if missing:
            raise UserError(f"{src} is not a diffusers-layout {fam.name} model folder: missing {', '.join(missing)}/")
    text = fam.load_text(src, kw, dtype)
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype, **kw)
    scheduler = fam.load_noise_scheduler(src, kw)
    if unet is None:
        unet_model = fam.load_denoiser(src, fam.denoiser_folder, kw, dtype)
    else:  # a checkpoint of ours (denoiser in unet/) or a bare model folder
        upath = Path(unet)
        sub = next((s for s in ("unet", fam.denoiser_folder) if (upath / s).is_dir()), None)
        unet_model = fam.load_denoiser(str(upath), sub, {"local_files_only": True}, dtype)
    return Components(unet=unet_model, vae=vae, scheduler=scheduler, family=fam.name, **text)


def tiny_clip_config(width: int = 32, layers: int = 3) -> Any:
    """A ``CLIPTextConfig`` at toy width over CLIP's real vocabulary and ids (the tiny SDXL / SD3 / Flux encoders)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=64, num_attention_heads=4, num_hidden_layers=layers,
        max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=width, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, hidden_act="gelu",
    )  # fmt: skip


def tiny_t5_encoder(vocab_size: int, width: int, d_ff: int) -> Any:
    """A 2-layer ``T5EncoderModel`` at toy width (the tiny SD3 / Flux text encoder)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_ff=d_ff, d_kv=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
    ))  # fmt: skip


def tiny_unet_config(
    channels: tuple[int, ...] = (16, 16, 32, 32),
    layers_per_block: int = 2,
    heads: int = 2,
    cross_attention_dim: int = 32,
    sample_size: int = 8,
) -> dict[str, Any]:
    """An SD-1.x-shaped UNet config (3 cross-attn down blocks, mid, 3 cross-attn up blocks), tiny widths."""
    n = len(channels)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=tuple(channels),
        down_block_types=tuple(["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]),
        up_block_types=tuple(["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' SD configs store the number of heads here
        norm_num_groups=8,
    )


def tiny_components(
    seed: int = 0,
    unet_channels: tuple[int, ...] = (16, 16, 32, 32),
    layers_per_block: int = 2,
    heads: int = 2,
    text_hidden: int = 32,
    text_layers: int = 2,
    vae_channels: tuple[int, ...] = (8, 8, 16, 16),
    image_size: int = 64,
    prediction_type: str = "epsilon",
) -> Components:
    """Random-init parts with the real classes and the real CLIP tokenizer; seconds to build on a CPU.

    The VAE downsamples by ``2 ** (len(vae_channels) - 1)`` (8 by default, as SD), so a 64-px image
    gives 8x8 latents and attention maps at 8, 4, 2 and 1 positions per side.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(
        **tiny_unet_config(unet_channels, layers_per_block, heads, text_hidden, image_size // factor)
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 2,
            num_attention_heads=4,
            num_hidden_layers=text_layers,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=text_hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler)
