"""What a model family is: the one seam between the package and an architecture.

A family owns what differs between architectures and nothing else:

- which text parts a pipeline folder holds and how they load (:meth:`Family.load_text`);
- the token index space phrases map into (:attr:`Family.index_tokenizer`: the tokenizer whose positions
  are the attention maps' columns) and the text-encoder inputs of a caption (:meth:`Family.tokenizers`);
- how a caption becomes the denoiser's conditioning (:meth:`Family.encode`);
- the default supervised attention layers (:attr:`Family.default_layers`);
- the pipeline class that samples from it, and the ``model_index.json`` that stock diffusers loads.

- how training noises latents and what the denoiser must predict (:meth:`Family.noise_latents`,
  :meth:`Family.predict`, :meth:`Family.target`): DDPM with epsilon / v targets for the UNet families
  (read from the noise scheduler's ``prediction_type``), rectified flow for the transformer families;
- where the denoiser lives in a folder and how a LoRA of it is saved for the stock pipeline.

Shapes: ``B`` batch, ``L`` text positions (77 for CLIP), ``D`` conditioning width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from tokencompose.data import records as R
from tokencompose.tokens import input_ids, phrase_token_positions


def target(scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon), the velocity (v) or the clean latents (sample).

    v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022, eq. in sec. 4), as ``scheduler.get_velocity`` computes.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, eps, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


@dataclass
class SpanFinder:
    """Phrase -> its positions in the model's text index space, or the reason it has none.

    Picklable (tokenizers only), so DataLoader workers get it with the dataset. ``parts``: ``(tokenizer,
    offset, method)`` -- a phrase must be found by every part, its positions are the union of each part's
    positions shifted by ``offset`` (SD3: CLIP at 0 and T5 at 77). ``agree``: tokenizers that feed other
    encoders at the *same* positions as ``parts[0]`` (SDXL's tokenizer 2): they must place the phrase there.
    """

    parts: Sequence[tuple[Any, int, str]]
    agree: Sequence[Any] = field(default_factory=tuple)

    def __call__(self, caption: str, phrase: str) -> tuple[list[int] | None, str | None]:
        positions: list[int] = []
        for tokenizer, offset, method in self.parts:
            pos = _positions(tokenizer, caption, phrase, None, method)
            if pos is None:
                found = _positions(tokenizer, caption, phrase, 1 << 30, method)
                return None, (R.BEYOND_TOKEN_WINDOW if found is not None else R.PHRASE_NOT_IN_CAPTION)
            positions += [offset + p for p in pos]
        first, _, method = self.parts[0]
        mine = _positions(first, caption, phrase, None, method)
        if any(_positions(tok, caption, phrase, None, method) != mine for tok in self.agree):
            return None, R.SPAN_DIFFERS
        return positions, None


def _positions(tokenizer: Any, caption: str, phrase: str, max_length: int | None, method: Any) -> list[int] | None:
    # "ids" is the paper's rule (CLIP); "offsets" locates the phrase by characters (SentencePiece / T5).
    return phrase_token_positions(tokenizer, caption, phrase, max_length, method=method)


class Family:
    """Base of the architecture families (:mod:`tokencompose.families.sd`, :mod:`tokencompose.families.sdxl`)."""

    name: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]
    """``model_index.json`` class names of this family; the first is the one we write and run."""
    text_parts: ClassVar[tuple[str, ...]]
    """Subfolders of a pipeline folder holding text encoders and tokenizers."""
    default_layers: ClassVar[tuple[str, ...]] = ("mid", "up")
    """Supervised cross-attention layers when ``loss.layers`` is not given (see ``tokencompose probe layers``)."""
    probe_layers: ClassVar[tuple[str, ...]] = ("down", "mid", "up")
    """Candidate layers of ``tokencompose probe layers`` (every text-attention layer of the denoiser)."""
    sampler: ClassVar[str] = "pndm"
    """Sampler of ``generate`` / ``evaluate`` when asked for ``auto`` (PNDM: the paper's MultiGen setting)."""
    figure_sampler: ClassVar[str] = "ddim"
    """Sampler of figures and training sample grids (deterministic)."""
    denoiser_folder: ClassVar[str] = "unet"
    """Subfolder of the denoiser in a pipeline folder (``transformer`` for SD3 / Flux)."""
    denoiser_class: ClassVar[str] = "UNet2DConditionModel"
    """diffusers class of the denoiser."""
    noise_scheduler_class: ClassVar[str] = "DDPMScheduler"
    """diffusers class the training noise schedule is read as."""

    # -- loading -----------------------------------------------------------------------------------
    def load_text(self, src: str, kw: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """Text encoders and tokenizers of a pipeline folder / hub id, as :class:`Components` fields."""
        raise NotImplementedError

    def tiny(self, seed: int = 0, image_size: int = 64, prediction_type: str = "epsilon") -> Any:
        """Random-init :class:`~tokencompose.models.Components` of this family's classes (tests, smoke runs)."""
        raise NotImplementedError

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def use_fused_attention(self, model: Any) -> None:
        """Every attention layer of the denoiser on PyTorch's fused SDPA (what sampling runs)."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.set_attn_processor(AttnProcessor2_0())

    def load_denoiser(self, src: str, subfolder: str | None, kw: Mapping[str, Any], dtype: torch.dtype) -> Any:
        """The denoiser from ``src`` (a pipeline folder with ``subfolder``, or a model folder with None)."""
        import diffusers

        cls = getattr(diffusers, self.denoiser_class)
        return cls.from_pretrained(src, subfolder=subfolder, torch_dtype=dtype, **kw)

    def load_noise_scheduler(self, src: str, kw: Mapping[str, Any]) -> Any:
        """The training noise schedule from the folder's ``scheduler/`` config."""
        import diffusers

        return getattr(diffusers, self.noise_scheduler_class).from_pretrained(src, subfolder="scheduler", **kw)

    def lora_layers(self, peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapter weights named as peft names them -> the key format :meth:`save_lora` writes: diffusers' names
        (``to_q.lora.down`` ...) for a UNet, as diffusers' SD / SDXL LoRA scripts save them."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)

    def save_lora(self, folder: Path, layers: dict[str, torch.Tensor]) -> None:
        """Write ``pytorch_lora_weights.safetensors`` that the family's stock ``load_lora_weights`` reads."""
        self.pipeline_class().save_lora_weights(
            save_directory=str(folder), **{f"{self.denoiser_folder}_lora_layers": layers}, safe_serialization=True
        )

    # -- text --------------------------------------------------------------------------------------
    def index_tokenizer(self, comps: Any) -> Any:
        """The tokenizer whose positions index the attention maps' text columns (phrase spans live here)."""
        return comps.tokenizer

    def span_finder(self, comps: Any, text_spans: str = "clip") -> SpanFinder:
        """How phrases map to the maps' text columns (``text_spans`` matters to families with several)."""
        return SpanFinder([(self.index_tokenizer(comps), 0, "ids")])

    def dataset_text(self, comps: Any, text_spans: str = "clip") -> dict[str, Any]:
        """``TokenDataset``'s text keywords for this model: every encoder input and the phrase-span rule."""
        return {"text_inputs": self.tokenizers(comps), "spans": self.span_finder(comps, text_spans)}

    def tokenizers(self, comps: Any) -> dict[str, Any]:
        """``{batch key: tokenizer}``: every text-encoder input a caption needs (``input_ids``, ...)."""
        return {"input_ids": comps.tokenizer}

    def tokenize(self, comps: Any, captions: list[str]) -> dict[str, torch.Tensor]:
        """``{batch key: ids [B, L]}`` for :meth:`encode`."""
        return {key: input_ids(tok, captions) for key, tok in self.tokenizers(comps).items()}

    def encode(
        self, comps: Any, batch: Mapping[str, Any], image_size: tuple[int, int], dtype: torch.dtype | None = None
    ) -> dict[str, Any]:
        """Denoiser keyword arguments for a batch (its ``input_ids``... and, where a family needs them,
        ``original_size`` / ``crop_top_left`` ``[B, 2]``); floating outputs cast to ``dtype`` when given.

        ``image_size``: ``(H, W)`` in pixels of the images being denoised.
        """
        raise NotImplementedError

    # -- saving ------------------------------------------------------------------------------------
    def model_index(self, comps: Any) -> dict[str, Any]:
        """The ``model_index.json`` of a folder holding ``comps`` (stock ``DiffusionPipeline`` reads it)."""
        import diffusers

        index: dict[str, Any] = {
            "_class_name": self.pipeline_classes[0],
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", type(comps.scheduler).__name__],
            self.denoiser_folder: ["diffusers", type(comps.unet).__name__],
            "vae": ["diffusers", type(comps.vae).__name__],
        }
        for part in self.text_parts:
            index[part] = ["transformers", type(getattr(comps, part)).__name__]
        return index

    # -- geometry ----------------------------------------------------------------------------------
    def native_size(self, denoiser: Any, vae_factor: int) -> int:
        """The model's native image side in pixels (latent sample size x VAE factor: 512 for SD 1.x)."""
        return int(denoiser.config.sample_size) * vae_factor

    def sampling_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """Initial noise ``[B, C, h, w]`` in the layout the family's pipeline takes as ``latents``."""
        return noise

    def map_sizes(self, comps: Any, image: tuple[int, int]) -> list[tuple[int, int]]:
        """``(h, w)`` of every attention resolution the denoiser has for an image of ``(H, W)`` pixels."""
        from tokencompose.masks import attention_sizes

        return attention_sizes(image, comps.vae_scale_factor, len(comps.unet.config.block_out_channels))

    # -- training ----------------------------------------------------------------------------------
    def noise_latents(
        self, scheduler: Any, latents: torch.Tensor, noise: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(noisy, t, eps)`` for clean ``latents [B, C, h, w]``: DDPM, ``t ~ U{0..T-1}``,
        ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, eq. 4). ``noise``: a
        :class:`~tokencompose.train.step.NoiseSource` (timesteps drawn first, then eps)."""
        b, device = latents.shape[0], latents.device
        t = noise.timesteps(b, scheduler.config.num_train_timesteps, device)
        eps = noise.randn(tuple(latents.shape), device)
        return scheduler.add_noise(latents, eps, t), t, eps

    def noisy_at(
        self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy, model timestep)`` at integer training timesteps ``t [B]`` (evaluation: fixed noise levels)."""
        return scheduler.add_noise(latents, eps, t), t

    def predict(self, model: Any, noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """The denoiser's prediction ``[B, C, h, w]`` (``model`` may be DDP-wrapped)."""
        return model(noisy, t, **cond).sample

    def target(self, scheduler: Any, latents: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of the denoiser (see :func:`target`)."""
        return target(scheduler, latents, eps, t)


def clip_pair_states(comps: Any, batch: Mapping[str, Any]) -> tuple[torch.Tensor, Any, Any]:
    """SDXL's and SD3's CLIP pair: penultimate hidden states of ``text_encoder`` and ``text_encoder_2`` joined on
    channels, ``[B, 77, D1 + D2]``, with both encoders' outputs (pooled embeddings in ``text_embeds``)."""
    device = comps.text_encoder.device
    out1 = comps.text_encoder(batch["input_ids"].to(device), output_hidden_states=True)
    out2 = comps.text_encoder_2(batch["input_ids_2"].to(device), output_hidden_states=True)
    return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out1, out2


def cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of a (nested) dict cast to ``dtype`` (None: unchanged)."""
    if dtype is None:
        return tree
    if isinstance(tree, dict):
        return {k: cast(v, dtype) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return tree.to(dtype)
    return tree
