"""What every family's pipeline does alike: where a component computes, image sizes and images out,
which source and options each component of ``load_pipeline`` gets, and the steps of an image
pipeline around its family's own sampling (:class:`ImagePipeline`).

Example:
    >>> import torch
    >>> device_of({"w": torch.zeros(1)}), dtype_of({"w": torch.zeros(1, dtype=torch.bfloat16)})
    (device(type='cpu'), torch.bfloat16)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import dsf
from dsf.files.hub import local_source
from dsf.files.io import read_json
from dsf.training.data import image_to_tensor, resize_and_crop, to_rgb
from dsf.weight import compute_device, compute_dtype


def _first_param(tree):
    return next(p for _, p in dsf.tree.leaves_with_paths(tree, is_leaf=lambda x: isinstance(x, dsf.Weight)))


def device_of(tree) -> torch.device:
    """Where a component computes: the compute device of its first parameter (offload's target if any)."""
    return compute_device(_first_param(tree))


def dtype_of(tree) -> torch.dtype:
    """What a component computes in: the compute dtype of its first parameter (fp8 decodes to it)."""
    return compute_dtype(_first_param(tree))


def check_size(height: int, width: int, multiple: int) -> None:
    """Refuse an image size the VAE and the patches cannot tile, naming the nearest sizes that work.

    >>> check_size(1000, 1024, 16)
    Traceback (most recent call last):
    ...
    ValueError: height 1000 is not a multiple of 16; use 992 or 1008
    """
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            lower, upper = max(multiple, value // multiple * multiple), (value // multiple + 1) * multiple
            raise ValueError(f"{name} {value} is not a multiple of {multiple}; use {lower} or {upper}")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Images (B, 3, H, W) in [-1, 1] as PIL images (diffusers' rounding: (x/2 + 0.5)·255, rounded).

    >>> to_pil(torch.zeros(1, 3, 2, 2))[0].getpixel((0, 0))
    (128, 128, 128)
    """
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


def pipeline_root(source, family: str) -> Path | None:
    """The local folder of a whole pipeline (a path or a hub source), or None; anything else is an error.

    >>> pipeline_root(None, "FLUX.1") is None
    True
    """
    root = None if source is None else local_source(source)
    if root is not None and not isinstance(root, Path):
        raise ValueError(f"a {family} pipeline source must be one folder, got {root!r}; pass component sources instead")
    return root


def component_source(given, root: Path | None, name: str, family: str):
    """A component's own source where one is given (as it is), else the pipeline folder.

    >>> component_source(None, None, "dit", "Wan")
    Traceback (most recent call last):
    ...
    ValueError: no source for the dit: pass source= (a Wan pipeline folder) or dit=
    """
    if given is not None:
        return given
    if root is None:
        raise ValueError(f"no source for the {name}: pass source= (a {family} pipeline folder) or {name}=")
    return root


def scheduler_config(root: Path | None, default: dict) -> dict:
    """A pipeline folder's ``scheduler/scheduler_config.json``, or ``default`` (the family's) when it has none.

    >>> scheduler_config(None, {"shift": 3.0})
    {'shift': 3.0}
    """
    found = None if root is None else root / "scheduler" / "scheduler_config.json"
    return read_json(found) if found is not None and found.is_file() else default


def component_options(dtype, device, component: str) -> dict:
    """``{"dtype", "device"}`` of one component, from one value for all or a dict per component (a component
    a dict leaves out gets its checkpoint's dtype, on the CPU).

    >>> component_options({"dit": torch.bfloat16}, "cpu", "vae")
    {'dtype': None, 'device': 'cpu'}
    """
    return {
        "dtype": dtype.get(component) if isinstance(dtype, dict) else dtype,
        "device": device.get(component, "cpu") if isinstance(device, dict) else device,
    }


def direct_distill_loss(pipe, pixels_per_latent: int, guidance: str = "cfg_scale", **denoise_options):
    """``loss(params, batch, key)``: MSE between the student's sampled latents and the teacher image's latents.

    For each sample the student runs ``pipe.denoise`` with gradients on, from the noise of the batch's ``seed`` over
    ``num_inference_steps`` steps, with the batch's ``cfg_scale`` as the denoise option named ``guidance`` (metadata
    columns) and ``denoise_options``, at the size of the target ``latents`` (the VAE latents of the image the teacher
    generated, ``pixels_per_latent`` pixels per latent side). ``key`` is unused: the metadata fixes the student's
    noise. Each family's ``training.direct_distill_loss(pipe)`` says its size and options.

    >>> import dsf
    >>> from dsf.models.z_image.tiny import tiny_pipeline
    >>> pipe = tiny_pipeline()
    >>> batch = {"latents": torch.zeros(1, 16, 4, 4), "prompt": ["a cat"], "seed": ["0"], "num_inference_steps": ["2"],
    ...          "cfg_scale": ["1"]}
    >>> float(direct_distill_loss(pipe, 8)(pipe.params, batch, dsf.random.key(0))) > 0
    True
    """

    def loss(params, batch, key):
        target = batch["latents"]
        height, width = target.shape[-2] * pixels_per_latent, target.shape[-1] * pixels_per_latent
        samples = zip(batch["prompt"], batch["seed"], batch["num_inference_steps"], batch["cfg_scale"])
        student = torch.cat([
            pipe.denoise(params, prompt, seed=int(seed), num_inference_steps=int(steps), height=height, width=width,
                         progress=False, **{guidance: float(scale)}, **denoise_options)
            for prompt, seed, steps, scale in samples
        ])
        return (student.float() - target.to(student.device).float()).square().mean()

    return loss


class ImagePipeline:
    """The steps every image pipeline takes alike around its family's sampling, for a family's pipeline dataclass to
    inherit: seeded noise, image in (``encode_image``), latents out (``decode``), PIL images (``generate``).

    The family defines ``params`` (the param tree, a property), ``latent_shape(height, width)`` (one image's initial
    latents), ``denoise(params, prompt, **options)`` (final latents; its docstring lists the options) and has a
    ``vae`` whose ``encode``/``decode`` map images (B, 3, H, W) in [-1, 1] to the DiT's latents and back.
    ``generate(params, prompt, ...)`` is a pure function of ``params``, so any transform wraps it;
    ``pipe(prompt, ...)`` calls it with the loaded params.
    """

    def noise(self, seed: int, batch: int, height: int, width: int, params) -> torch.Tensor:
        """Initial latents (B, *latent_shape), drawn in float32 on the CPU from ``seed`` (image i: ``fold_in(key, i)``),
        on the DiT's device and dtype."""
        key = dsf.random.key(seed)
        draws = [dsf.random.normal(dsf.random.fold_in(key, i), self.latent_shape(height, width)) for i in range(batch)]
        return torch.stack(draws).to(device_of(params["dit"]), dtype_of(params["dit"]))

    def encode_image(self, params, image: Image.Image, height: int, width: int, batch: int) -> torch.Tensor:
        """An input image resized and center-cropped to height×width, as normalized latents on the DiT's device."""
        pixels = image_to_tensor(resize_and_crop(to_rgb(image), height, width))[None].repeat(batch, 1, 1, 1)
        latents = self.vae.encode(params["vae"], pixels.to(device_of(params["vae"]), dtype_of(params["vae"])))
        return latents.to(device_of(params["dit"]), dtype_of(params["dit"]))

    def decode(self, params, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from latents, on the VAE's device and dtype."""
        return self.vae.decode(params["vae"], latents.to(device_of(params["vae"]), dtype_of(params["vae"])))

    def generate(self, params, prompt, **options) -> Image.Image | list[Image.Image]:
        """PIL images for ``prompt``: one image for a string, a list for a list of prompts; ``options`` are
        :meth:`denoise`'s."""
        with torch.no_grad():
            images = to_pil(self.decode(params, self.denoise(params, prompt, **options)))
        return images[0] if isinstance(prompt, str) else images

    def __call__(self, prompt, **options):
        return self.generate(self.params, prompt, **options)
