"""Configuration of the Z-Image DiT (S3-DiT), and how a checkpoint's shapes and config files fill it in.

Sources of a loaded model's config, each overriding the one before: the official Z-Image(-Turbo)
defaults < what the checkpoint's shapes say < the diffusers ``config.json`` beside the weights <
the ``config=`` the caller passes (diffusers key names, or a whole :class:`ZImageConfig`).

Example:
    >>> ZImageConfig().hidden_size, ZImageConfig().mlp_hidden_size, ZImageConfig().head_dim
    (3840, 10240, 128)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from dsf.files import loading

ADALN_DIM = 256  # width of the timestep embedding that modulates the blocks (min(hidden, 256))
TIMESTEP_FEATURES = 256  # sinusoidal features of the timestep
TIMESTEP_MID = 1024  # hidden width of the timestep MLP
SEQ_MULTIPLE = 32  # image and caption sequences are padded to a multiple of this with learned pad tokens
PATCH = 2  # 2×2 latent patches, one frame

DIFFUSERS_KEYS = {  # diffusers ZImageTransformer2DModel config key -> ZImageConfig field
    "in_channels": "in_channels",
    "dim": "hidden_size",
    "n_layers": "num_layers",
    "n_refiner_layers": "num_refiner_layers",
    "n_heads": "num_heads",
    "norm_eps": "norm_eps",
    "cap_feat_dim": "cap_feat_dim",
    "rope_theta": "rope_theta",
    "t_scale": "t_scale",
    "axes_dims": "axes_dims",
    "axes_lens": "axes_lens",
}
# keys whose other values change the network in ways this implementation does not build: {key: (supported?, what)}
SUPPORTED_ONLY = {
    "all_patch_size": (lambda v: list(v) == [PATCH], "[2] (2×2 patches; other patch sizes are not implemented)"),
    "all_f_patch_size": (lambda v: list(v) == [1], "[1] (one frame per patch)"),
    "qk_norm": (lambda v: v is True, "True (every released Z-Image normalizes q and k)"),
    "siglip_feat_dim": (lambda v: v is None, "None (the Omni SigLIP branch is not implemented)"),
}
IGNORED_KEYS = {"n_kv_heads"}  # diffusers builds full multi-head attention whatever it says
_SIZE_READINGS = {  # ZImageConfig field -> (key, axis) of the checkpoint shape that holds it
    "hidden_size": ("cap_embedder.1.weight", 0),
    "cap_feat_dim": ("cap_embedder.1.weight", 1),
}


@dataclass(frozen=True)
class ZImageConfig:
    """Sizes of a Z-Image DiT; the defaults are Z-Image and Z-Image-Turbo (same network).

    ``in_channels`` are the VAE latent channels (a token is a 2×2 patch of them).

    >>> ZImageConfig(hidden_size=64, num_heads=2, axes_dims=(8, 12, 12)).head_dim
    32
    """

    in_channels: int = 16
    hidden_size: int = 3840
    num_layers: int = 30
    num_refiner_layers: int = 2
    num_heads: int = 30
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims", tuple(self.axes_dims))
        object.__setattr__(self, "axes_lens", tuple(self.axes_lens))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if sum(self.axes_dims) != self.head_dim or len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(
                f"axes_dims {self.axes_dims} must be 3 sizes summing to head_dim {self.head_dim} (RoPE rotates the whole "
                f"head over (caption index, row, column)), with 3 axes_lens {self.axes_lens}: pass "
                "config={'axes_dims': [...], 'axes_lens': [...]} when loading"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_size(self) -> int:
        """The SwiGLU width, ``int(hidden / 3 · 8)`` as diffusers builds it."""
        return int(self.hidden_size / 3 * 8)

    @property
    def adaln_dim(self) -> int:
        return min(self.hidden_size, ADALN_DIM)

    @property
    def patch_channels(self) -> int:
        """Width of one 2×2 latent patch (``in_channels`` · 4)."""
        return self.in_channels * PATCH * PATCH


def fields_from_diffusers(config: Mapping, strict: bool) -> dict:
    """ZImageConfig fields from diffusers config keys; ``strict`` rejects keys it does not know.

    Keys starting with ``_`` and ``None`` values are skipped; keys the network supports one value of are checked
    (``siglip_feat_dim: null``, which current diffusers writes, loads).

    >>> fields_from_diffusers({"n_layers": 2, "siglip_feat_dim": None, "_class_name": "ZImageTransformer2DModel"}, strict=True)
    {'num_layers': 2}
    >>> fields_from_diffusers({"siglip_feat_dim": 1152}, strict=False)
    Traceback (most recent call last):
    ...
    ValueError: Z-Image config siglip_feat_dim=1152 is not supported by the Z-Image DiT: it must be None (the Omni SigLIP branch is not implemented)
    """
    loading.check_supported_values(config, SUPPORTED_ONLY, "Z-Image", "Z-Image DiT")
    if strict:
        known = {*DIFFUSERS_KEYS, *SUPPORTED_ONLY, *IGNORED_KEYS}
        loading.check_known_config_keys(config, known, known, "Z-Image")
    return {DIFFUSERS_KEYS[k]: v for k, v in config.items() if k in DIFFUSERS_KEYS and v is not None}


def fields_from_shapes(shapes: Mapping[str, tuple]) -> dict:
    """ZImageConfig fields implied by the shapes of a checkpoint in our (diffusers) key layout.

    The head size is the length of the per-head q norm scale, so heads = hidden / head size.
    Keys that are absent are skipped (the key check reports them).

    >>> fields = fields_from_shapes({"cap_embedder.1.weight": (3840, 2560), "all_x_embedder.2-1.weight": (3840, 64),
    ...                              "layers.29.attention.norm_q.weight": (128,), "noise_refiner.1.ffn_norm1.weight": (3840,)})
    >>> fields["num_heads"], fields["num_layers"], fields["num_refiner_layers"], fields["in_channels"]
    (30, 30, 2, 16)
    """
    fields = loading.sizes_from_shapes(shapes, _SIZE_READINGS)
    embedder = shapes.get("all_x_embedder.2-1.weight")
    if embedder is not None:
        fields["in_channels"] = embedder[1] // (PATCH * PATCH)
    head_norm = next((shapes[k] for k in shapes if k.endswith("attention.norm_q.weight")), None)
    if head_norm is not None and "hidden_size" in fields:
        fields["num_heads"] = fields["hidden_size"] // head_norm[0]
    fields["num_layers"] = loading.numbered_count(shapes, "layers.")
    fields["num_refiner_layers"] = loading.numbered_count(shapes, "noise_refiner.")
    return fields


def resolve_config(
    shapes: Mapping[str, tuple], config_json: Mapping | None = None, config: Mapping | ZImageConfig | None = None
) -> ZImageConfig:
    """The config of a checkpoint: defaults < its shapes < its ``config.json`` < ``config``.

    A :class:`ZImageConfig` passed as ``config`` is taken as is.

    >>> shapes = {"cap_embedder.1.weight": (64, 32), "layers.0.attention.norm_q.weight": (32,)}
    >>> resolve_config(shapes, {"axes_dims": [8, 12, 12]}, {"n_refiner_layers": 1}).num_heads
    2
    """
    if isinstance(config, ZImageConfig):
        return config
    return ZImageConfig(**loading.config_fields(fields_from_shapes(shapes), config_json, config, fields_from_diffusers))
