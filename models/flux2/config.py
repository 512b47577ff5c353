"""Configuration of the FLUX.2 DiT, and how a checkpoint's shapes and config files fill it in.

Sources of a loaded model's config, each overriding the one before: the official FLUX.2-dev defaults <
what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights < the ``config=`` the
caller passes (diffusers ``Flux2Transformer2DModel`` key names, or a whole :class:`Flux2Config`).

Example:
    >>> Flux2Config().hidden_size, KLEIN_4B.hidden_size, KLEIN_9B.context_dim
    (6144, 3072, 12288)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from dsf.files import loading

DIFFUSERS_KEYS = {  # diffusers Flux2Transformer2DModel config key -> Flux2Config field
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_layers": "num_double_blocks",
    "num_single_layers": "num_single_blocks",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "joint_attention_dim": "context_dim",
    "timestep_guidance_channels": "timestep_channels",
    "mlp_ratio": "mlp_ratio",
    "axes_dims_rope": "axes_dims_rope",
    "rope_theta": "rope_theta",
    "eps": "eps",
    "guidance_embeds": "guidance_embeds",
}
_SIZE_READINGS = {  # Flux2Config field -> (key, axis) of the checkpoint shape that holds it
    "in_channels": ("x_embedder.weight", 1),
    "out_channels": ("proj_out.weight", 0),
    "context_dim": ("context_embedder.weight", 1),
    "timestep_channels": ("time_guidance_embed.timestep_embedder.linear_1.weight", 1),
}


@dataclass(frozen=True)
class Flux2Config:
    """Sizes of a FLUX.2 DiT; the defaults are FLUX.2-dev (:data:`KLEIN_4B` and :data:`KLEIN_9B` are klein's).

    ``in_channels`` is the width of a latent token: 32 VAE channels × a 2×2 patch.

    >>> Flux2Config(num_heads=2, head_dim=16, axes_dims_rope=(4, 4, 4, 4)).mlp_hidden_size
    96
    """

    in_channels: int = 128
    out_channels: int = 128
    num_heads: int = 48
    head_dim: int = 128
    num_double_blocks: int = 8
    num_single_blocks: int = 48
    context_dim: int = 15360
    timestep_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)} but head_dim is {self.head_dim}; "
                "RoPE rotates the whole head: pass axes_dims_rope that sum to head_dim "
                "(e.g. config={'axes_dims_rope': [...]} when loading)"
            )
        if len(self.axes_dims_rope) != 4:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must have 4 axes: FLUX.2 positions are (t, h, w, l)")

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


KLEIN_4B = Flux2Config(num_heads=24, num_double_blocks=5, num_single_blocks=20, context_dim=7680, guidance_embeds=False)
KLEIN_9B = Flux2Config(num_heads=32, num_double_blocks=8, num_single_blocks=24, context_dim=12288, guidance_embeds=False)


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """Flux2Config fields from diffusers config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) and ``None`` values are skipped;
    ``patch_size`` must be 1 (the pipeline patchifies the latents itself).

    >>> fields_from_diffusers({"num_layers": 5, "out_channels": None, "_class_name": "Flux2Transformer2DModel"}, strict=True)
    {'num_double_blocks': 5}
    >>> fields_from_diffusers({"patch_size": 2}, strict=False)
    Traceback (most recent call last):
    ...
    ValueError: Flux2Transformer2DModel config patch_size=2 is not supported by the FLUX.2 DiT: it must be 1 (the pipeline cuts 2×2 patches before the DiT)
    """
    required = {"patch_size": (lambda v: v == 1, "1 (the pipeline cuts 2×2 patches before the DiT)")}
    if strict:
        loading.check_known_config_keys(config, {*DIFFUSERS_KEYS, *required}, DIFFUSERS_KEYS, "Flux2Transformer2DModel")
    loading.check_supported_values(config, required, "Flux2Transformer2DModel", "FLUX.2 DiT")
    return {DIFFUSERS_KEYS[k]: v for k, v in config.items() if k in DIFFUSERS_KEYS and v is not None}


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """Flux2Config fields implied by the shapes of a checkpoint in our (diffusers) key layout.

    The head size is the length of the per-head q/k norm scale, so heads = hidden / head size; the MLP
    ratio is read off the fused SwiGLU input (two halves of ``mlp_ratio``·hidden rows). Keys that are
    absent are skipped (the key check reports them).

    >>> fields = fields_from_shapes({"x_embedder.weight": (3072, 128), "transformer_blocks.0.attn.norm_q.weight": (128,),
    ...                              "transformer_blocks.0.ff.linear_in.weight": (18432, 3072)})
    >>> fields["num_heads"], fields["mlp_ratio"], fields["num_double_blocks"], fields["guidance_embeds"]
    (24, 3.0, 1, False)
    """
    hidden = shapes.get("x_embedder.weight", (None,))[0]
    fields = loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    head_norm = next((shapes[k] for k in shapes if k.endswith("attn.norm_q.weight")), None)
    if head_norm is not None:
        fields["head_dim"] = head_norm[0]
        if hidden is not None:
            fields["num_heads"] = hidden // head_norm[0]
    swiglu_in = next((shapes[k] for k in shapes if k.endswith("ff.linear_in.weight")), None)
    if swiglu_in is not None:
        fields["mlp_ratio"] = swiglu_in[0] / 2 / swiglu_in[1]
    fields["num_double_blocks"] = loading.numbered_count(shapes, "transformer_blocks.")
    fields["num_single_blocks"] = loading.numbered_count(shapes, "single_transformer_blocks.")
    fields["guidance_embeds"] = any(k.startswith("time_guidance_embed.guidance_embedder.") for k in shapes)
    return fields


def resolve_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | Flux2Config | None = None
) -> Flux2Config:
    """The config of a checkpoint: defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`Flux2Config` passed as ``config`` is taken as is.

    >>> shapes = {"x_embedder.weight": (32, 128), "transformer_blocks.0.attn.norm_q.weight": (16,)}
    >>> resolve_config(shapes, {"axes_dims_rope": [4, 4, 4, 4]}, {"guidance_embeds": False}).num_heads
    2
    """
    if isinstance(config, Flux2Config):
        return config
    return Flux2Config(**loading.config_fields(fields_from_shapes(shapes), config_json, config, fields_from_diffusers))


def config_to_diffusers(config: Flux2Config) -> dict:
    """The diffusers ``Flux2Transformer2DModel`` config of ours (for writing a ``config.json`` or building theirs).

    >>> config_to_diffusers(Flux2Config())["num_attention_heads"]
    48
    """
    ours_to_theirs = {field: key for key, field in DIFFUSERS_KEYS.items()}
    return {ours_to_theirs[f.name]: getattr(config, f.name) for f in dataclasses.fields(config)} | {"patch_size": 1}
