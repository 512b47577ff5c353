"""Qwen-Image-Edit (-2509, -2511): the prompt encoding where Qwen2.5-VL sees the condition images, and the pipeline.

The Edit models encode a prompt together with the condition images, in their template (Edit-2509/2511:
:data:`EDIT_TEMPLATE` with a "Picture N:" prefix per image; the first Edit: :data:`EDIT_SINGLE_TEMPLATE`, one image;
the first :data:`EDIT_DROP` template tokens dropped): the images are cut into patches by Qwen's image
processor, the vision tower (transformers' module called on its own params, :func:`dsf.model_parts.modules.call_module`)
turns them into one state per 2×2 patch group, those states replace the ``<|image_pad|>`` tokens (expanded to one per
state) in the language model's input embeddings, and the language model runs at transformers' 3-D positions
(``get_rope_index``: text tokens advance on all axes, image tokens take their (frame, row, column)), its layers
through :func:`dsf.run_blocks` (:mod:`dsf.model_parts.decoder_lm`). The last hidden state after the dropped part is
the DiT's conditioning, image tokens included, as for text-to-image.

:class:`QwenImageEditPipeline` edits (or composes) one to three condition images (the first Edit: one): each is
resized to about :data:`CONDITION_AREA` pixels for the vision tower (the first Edit: :data:`VAE_AREA`) and
:data:`VAE_AREA` for the VAE, whose latents follow the image's
tokens in the DiT (frame index 1, 2, ...; at t = 0 for a ``zero_cond_t`` DiT, Edit-2511); the output is the last
image's aspect at about :data:`VAE_AREA` pixels unless sized.

Sources: the text encoder's own files (``visual.*`` or ``model.visual.*`` beside the language model), its
``config.json`` (``vision_config``), and Qwen's image processor (a pipeline folder's ``processor/``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from PIL import Image

from dsf.files import loading
from dsf.files.hub import local_source
from dsf.files.io import Source, read_json
from dsf.model_parts.input_checks import prompt_lists
from dsf.model_parts.modules import call_module, meta_module, state_shapes
from dsf.diffusion.sampling import sample
from dsf.model_parts.pipelines import check_size, device_of, dtype_of, pipeline_root
from dsf.models.qwen_image.pipeline import CFG_SCALE, NEGATIVE_PROMPT, NUM_INFERENCE_STEPS, QwenImagePipeline, load_pipeline
from dsf.models.qwen_image.text import NAME, QwenTextEncoder, text_config
from dsf.training.data import image_to_tensor, to_rgb
from dsf.weight import dense

# diffusers' QwenImageEditPlusPipeline (Edit-2509, Edit-2511): the template, the dropped system part, the image prefix
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# diffusers' QwenImageEditPipeline (the first Qwen-Image-Edit): one image, its tokens inside the template
EDIT_SINGLE_TEMPLATE = EDIT_TEMPLATE.replace("user\n{}", "user\n<|vision_start|><|image_pad|><|vision_end|>{}")
EDIT_DROP = 64
PICTURE_TEMPLATE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
CONDITION_AREA = 384 * 384  # pixels of a condition image as the vision tower sees it
VAE_AREA = 1024 * 1024  # pixels of a condition image as the VAE encodes it (and of the output by default)
VISUAL_MARKER = "patch_embed.proj.weight"
VISUAL_PARTS = ("patch_embed.", "blocks.", "merger.")
# Qwen/Qwen-Image-Edit-2509's text_encoder/config.json, its vision_config (Qwen2.5-VL-7B's vision tower)
QWEN25_VL_7B_VISION_CONFIG = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu", "in_chans": 3,
}


def area_size(area: int, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels with the aspect of ``width × height``, multiples of 32
    (diffusers' ``calculate_dimensions``).

    >>> area_size(384 * 384, 1200, 800)
    (480, 320)
    """
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / 32) * 32, round(new_width / ratio / 32) * 32


@dataclass(frozen=True)
class QwenVision:
    """Qwen2.5-VL's vision tower as data: its ``params``, the module (on ``meta``: the code only), the model object
    whose ``get_rope_index`` gives the 3-D positions (on ``meta`` too), and Qwen's image processor."""

    params: dict = field(repr=False)
    visual: torch.nn.Module = field(repr=False)
    positions: Any = field(repr=False)
    image_processor: Any = field(repr=False)
    image_token_id: int
    frequencies: dict = field(repr=False, default_factory=dict)  # the rotary embedding's buffers (no weights)

    def image_states(self, params, images: Sequence[Image.Image], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states (N, hidden) of all images' merged patches, grid (images, 3))``."""
        processed = self.image_processor(images=list(images), return_tensors="pt")
        pixels, grid = processed["pixel_values"].to(device), processed["image_grid_thw"].to(device)
        weight = dense(params["patch_embed"]["proj"]["weight"])
        frequencies = {name: tensor.to(device) for name, tensor in self.frequencies.items()}
        return call_module(self.visual, {**params, "rotary_pos_emb": frequencies}, pixels.to(weight.dtype),
                           grid_thw=grid).pooler_output, grid


def edit_prompt(encoder: QwenTextEncoder, vision: QwenVision, params: Mapping, prompts: str | Sequence[str],
                images: Sequence[Image.Image], template: str = EDIT_TEMPLATE, numbered: bool = True):
    """``(text_embeds, text_mask)`` of each prompt with the condition ``images`` (the same images for every prompt)
    in ``template``, after a "Picture N:" prefix per image when ``numbered``; ``params`` holds ``text_encoder`` and
    ``vision``.

    >>> from dsf.models.qwen_image.tiny import tiny_edit_encoders
    >>> encoder, vision = tiny_edit_encoders()
    >>> embeds, mask = edit_prompt(encoder, vision, {"text_encoder": encoder.params, "vision": vision.params}, "a cat",
    ...                            [Image.new("RGB", (56, 56))])
    >>> embeds.shape, bool(mask.all())  # 'user', '\\n', "Picture 1: ", its 4 image states, 'a', ' cat', the end
    (torch.Size([1, 20, 16]), True)
    """
    prompts, _ = prompt_lists(prompts, "")
    device = dense(params["text_encoder"]["embed_tokens"]["weight"]).device
    states, grid = vision.image_states(params["vision"], images, device)
    merge = vision.visual.spatial_merge_size ** 2
    prefix = "".join(PICTURE_TEMPLATE.format(index + 1) for index in range(len(images))) if numbered else ""
    texts = [_expanded(template.format(prefix + prompt), (grid.prod(-1) // merge).tolist()) for prompt in prompts]
    batch = encoder.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    ids, keep = batch["input_ids"].to(device), batch["attention_mask"].to(device).bool()
    is_image = ids == vision.image_token_id
    embeds = torch.nn.functional.embedding(ids, dense(params["text_encoder"]["embed_tokens"]["weight"]))
    embeds = embeds.masked_scatter(is_image[..., None], states.to(embeds.dtype).repeat(len(prompts), 1))
    positions, _ = vision.positions.get_rope_index(ids, mm_token_type_ids=is_image.int(), image_grid_thw=grid.repeat(len(prompts), 1),
                                                   attention_mask=keep)
    (hidden,) = encoder.states(params["text_encoder"], None, keep, inputs_embeds=embeds, position_ids=positions)
    return encoder.after_template(hidden, keep, EDIT_DROP, limited=False)  # as diffusers' Edit pipelines: no cut


def _expanded(text: str, counts: Sequence[int]) -> str:
    """``text`` with its ``<|image_pad|>`` tokens, in order, repeated ``counts`` times (one per merged image state).

    >>> _expanded("a<|image_pad|>b<|image_pad|>", [2, 1])
    'a<|image_pad|><|image_pad|>b<|image_pad|>'
    """
    pieces = text.split(IMAGE_PAD)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"the prompt template holds {len(pieces) - 1} image tokens for {len(counts)} images")
    return pieces[0] + "".join(IMAGE_PAD * count + piece for count, piece in zip(counts, pieces[1:]))


def load_vision(source: Source, image_processor=None, *, config: Any = None, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> QwenVision:
    """Qwen2.5-VL's vision tower from the text encoder's sources (see the module docstring); ``image_processor``: a
    folder (a pipeline folder's ``processor/`` by default) or an image processor object.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLImageProcessor
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    root = local_source(source)
    weights = loading.pipeline_component(root, "text_encoder", NAME)
    found = loading.config_of_kind(weights, "model_type", "qwen2_5_vl") or {}
    vision = dict(QWEN25_VL_7B_VISION_CONFIG) | dict(found.get("vision_config") or {})
    given = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    vision |= dict(given.get("vision_config") or {})
    image_token_id = given.get("image_token_id", found.get("image_token_id", 151655))
    full = Qwen2_5_VLConfig(text_config=text_config(config, found).to_dict(), vision_config=vision,
                            image_token_id=image_token_id)
    visual = meta_module(Qwen2_5_VisionTransformerPretrainedModel, full.vision_config)
    if image_processor is None or isinstance(image_processor, (str, os.PathLike)):
        folder = image_processor or loading.pipeline_part(root, "text_encoder", "processor")
        if folder is None:
            raise ValueError("pass image_processor=: the folder of Qwen's image processor (an Edit pipeline's processor/), "
                             "or an image processor object")
        image_processor = Qwen2VLImageProcessor.from_pretrained(str(loading.local_folder(folder, "image processor")))

    def to_ours(flat):
        prefix = loading.encoder_prefix(flat, VISUAL_MARKER, f"{NAME} vision tower")
        return loading.encoder_tensors(flat, prefix, VISUAL_PARTS, "")

    with torch.device("cpu"):  # the rotary embedding holds frequencies computed from the config, not weights
        rotary = type(visual.rotary_pos_emb)(visual.config)
    frequencies = dict(rotary.named_buffers())
    shapes = {key: shape for key, shape in state_shapes(visual).items() if not key.startswith("rotary_pos_emb.")}
    params = loading.encoder_params("Qwen-Image", f"{NAME} vision tower", weights, to_ours, shapes, dtype, device)
    return QwenVision(params, visual, meta_module(Qwen2_5_VLModel, full), image_processor, image_token_id, frequencies)


@dataclass(frozen=True)
class QwenImageEditPipeline(QwenImagePipeline):
    """A Qwen-Image pipeline with the vision tower: :meth:`generate` takes ``images``, the condition images.

    >>> from dsf.models.qwen_image.tiny import tiny_edit_pipeline
    >>> pipe = tiny_edit_pipeline()
    >>> pipe("make it red", images=[Image.new("RGB", (80, 48))], num_inference_steps=2, progress=False).size  # about 64² pixels, multiples of 32
    (96, 64)
    """

    vision: QwenVision | None = None
    condition_area: int = CONDITION_AREA
    vae_area: int = VAE_AREA
    template: str = EDIT_TEMPLATE
    max_images: int = 3  # the first Edit: one image, in EDIT_SINGLE_TEMPLATE, seen at VAE_AREA

    @property
    def params(self) -> dict:
        """The param tree :meth:`generate` takes: ``{"dit", "vae", "text_encoder", "vision"}``."""
        return {**super().params, "vision": self.vision.params}

    def edit_prompt_states(self, params, prompts: Sequence[str], images: Sequence[Image.Image]) -> tuple:
        """``(text_embeds, text_mask)`` of prompts with the condition images (resized for the vision tower), where the
        text encoder computes."""
        seen = [image.resize(area_size(self.condition_area, *image.size), Image.LANCZOS) for image in images]
        return edit_prompt(self.text_encoder, self.vision, params, prompts, seen, self.template,
                           numbered=self.template == EDIT_TEMPLATE)

    def encode_edit_prompts(self, params, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict:
        """DiT conditioning of prompts with the condition images: :meth:`edit_prompt_states` on the DiT's device."""
        embeds, mask = self.edit_prompt_states(params, prompts, images)
        return {"text_embeds": embeds.to(device_of(params["dit"]), dtype_of(params["dit"])),
                "text_mask": mask.to(device_of(params["dit"]))}

    def condition_latents(self, params, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """The condition images resized to about ``vae_area`` pixels, as normalized latents (1, 16, h, w) where the
        VAE computes (its device and dtype)."""
        device, dtype = device_of(params["vae"]), dtype_of(params["vae"])
        resized = (image_to_tensor(to_rgb(image).resize(area_size(self.vae_area, *image.size), Image.LANCZOS)) for image in images)
        return [self.vae.encode(params["vae"], pixels[None].to(device, dtype)) for pixels in resized]

    def reference_latents(self, params, images: Sequence[Image.Image], batch: int) -> list[torch.Tensor]:
        """:meth:`condition_latents` repeated ``batch`` times, on the DiT's device and in its dtype."""
        device, dtype = device_of(params["dit"]), dtype_of(params["dit"])
        return [latents.repeat(batch, 1, 1, 1).to(device, dtype) for latents in self.condition_latents(params, images)]

    def denoise(self, params, prompt, *, images: Sequence[Image.Image] = (), negative_prompt=NEGATIVE_PROMPT, seed: int = 0,
                num_inference_steps: int = NUM_INFERENCE_STEPS, height: int | None = None, width: int | None = None,
                cfg_scale: float = CFG_SCALE, noise: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
        """Final latents for ``prompt`` with the condition ``images`` (1 to 3 PIL images; the first Edit: 1); the
        options are :meth:`QwenImagePipeline.denoise`'s but image-to-image, and the size defaults to the last image's
        aspect at about ``vae_area`` pixels."""
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        if not 1 <= len(images) <= self.max_images:
            raise ValueError(f"this Qwen-Image-Edit model takes 1 to {self.max_images} condition images, got "
                             f"{len(images)}; pass images=[...]")
        default_width, default_height = area_size(self.vae_area, *images[-1].size)
        height = (height or default_height) // self.multiple * self.multiple
        width = (width or default_width) // self.multiple * self.multiple
        check_size(height, width, self.multiple)
        if noise is None:
            noise = self.noise(seed, len(prompts), height, width, params)
        tokens = (height // self.multiple) * (width // self.multiple)
        sigmas = self.schedule.sigmas(num_inference_steps, image_seq_len=tokens)
        references = self.reference_latents(params, images, len(prompts))
        guidance = {"positive": {**self.encode_edit_prompts(params, prompts, images), "reference_latents": references},
                    "cfg_scale": cfg_scale}
        if cfg_scale != 1.0:
            guidance["negative"] = {**self.encode_edit_prompts(params, negatives, images), "reference_latents": references}
        return sample(self.velocity, params, noise, sigmas, guidance, progress=progress, desc="Qwen-Image-Edit")


def load_edit_pipeline(source=None, *, text_encoder=None, image_processor=None, dtype=None, device="cpu",
                       text_encoder_config=None, single: bool | None = None, **options) -> QwenImageEditPipeline:
    """A Qwen-Image-Edit pipeline from a diffusers folder or hub repo (``Qwen/Qwen-Image-Edit-2509``,
    ``Qwen/Qwen-Image-Edit-2511``, ``Qwen/Qwen-Image-Edit``), or component sources as
    :func:`dsf.models.qwen_image.pipeline.load_pipeline` takes them; the vision tower comes from the text encoder's
    files, ``image_processor`` (default: the folder's ``processor/``) is Qwen's image processor. ``single``: the first
    Edit's one-image form (default: when the folder's ``model_index.json`` names ``QwenImageEditPipeline``).
    """
    pipe = load_pipeline(source, text_encoder=text_encoder, dtype=dtype, device=device,
                         text_encoder_config=text_encoder_config, **options)
    encoder_source = text_encoder if text_encoder is not None else pipeline_root(source, "Qwen-Image-Edit")
    vision = load_vision(encoder_source, image_processor, config=text_encoder_config,
                         dtype=dtype.get("text_encoder") if isinstance(dtype, dict) else dtype,
                         device=device.get("text_encoder", "cpu") if isinstance(device, dict) else device)
    fields = {name: getattr(pipe, name) for name in pipe.__dataclass_fields__}
    root = pipeline_root(source, "Qwen-Image-Edit")
    index = root / "model_index.json" if root is not None else None
    if single is None:
        single = index is not None and index.is_file() and read_json(index).get("_class_name") == "QwenImageEditPipeline"
    form = {"template": EDIT_SINGLE_TEMPLATE, "max_images": 1, "condition_area": VAE_AREA} if single else {}
    return QwenImageEditPipeline(**fields, vision=vision, **form)
