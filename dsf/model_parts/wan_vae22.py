"""What the Wan 2.2 VAE adds to Wan 2.1's: 2×2 pixel patches and parameter-free resampling shortcuts.

The Wan 2.2 VAE (48 latent channels, ×16 spatial, ×4 temporal) folds each 2×2 pixel patch into
channels before its encoder (3 → 12 channels) and unfolds them after its decoder, and wraps each
encoder level in a shortcut that averages space-time blocks into channels (``avg_down``, diffusers'
``AvgDown3D``) and each decoder level in one that duplicates channels into space-time blocks
(``dup_up``, ``DupUp3D``). Its latents are normalized with 48 per-channel statistics.

Example:
    >>> import torch
    >>> video = torch.randn(1, 3, 5, 8, 8)
    >>> patches = patchify(video, 2)
    >>> patches.shape, torch.equal(unpatchify(patches, 2), video)
    (torch.Size([1, 12, 5, 4, 4]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat

WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


def patchify(video: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C·p·p, T, H/p, W/p), channels ordered (c, column in patch, row in patch) as Wan's.

    ``patch_size`` None or 1 leaves the video as it is.

    >>> patchify(torch.arange(4.0).reshape(1, 1, 1, 2, 2), 2).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0]
    """
    if not patch_size or patch_size == 1:
        return video
    return rearrange(video, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=patch_size, pw=patch_size)  # (B, C·p·p, T, H/p, W/p)


def unpatchify(patches: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, C·p·p, T, h, w) -> (B, C, T, h·p, w·p).

    >>> unpatchify(torch.tensor([0.0, 2.0, 1.0, 3.0]).reshape(1, 4, 1, 1, 1), 2).flatten().tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    if not patch_size or patch_size == 1:
        return patches
    return rearrange(patches, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=patch_size, pw=patch_size)  # (B, C, T, h·p, w·p)


def avg_down(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """Fold each factor_t × factor_s × factor_s block into channels, then average groups of them down to ``out_channels``.

    A chunk whose frame count is not a multiple of ``factor_t`` (the first frame) is zero-padded in front.

    >>> avg_down(torch.ones(1, 2, 1, 4, 4), out_channels=4, factor_t=2, factor_s=2).shape
    torch.Size([1, 4, 1, 2, 2])
    >>> avg_down(torch.ones(1, 2, 1, 4, 4), out_channels=4, factor_t=2, factor_s=2)[0, :, 0, 0, 0].tolist()  # padding, frame
    [0.0, 1.0, 0.0, 1.0]
    """
    x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % factor_t, 0))
    blocks = rearrange(
        x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=factor_t, fh=factor_s, fw=factor_s
    )  # (B, C·ft·fs·fs, T/ft, H/fs, W/fs)
    return reduce(blocks, "b (o g) t h w -> b o t h w", "mean", o=out_channels)  # (B, out, T/ft, H/fs, W/fs)


def dup_up(x: torch.Tensor, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> torch.Tensor:
    """Repeat each channel, then unfold channel groups into factor_t × factor_s × factor_s space-time blocks.

    On the first chunk (the first latent frame) only the last of the ``factor_t`` frames is kept,
    as the decoder's temporal upsampler does not double that frame.

    >>> dup_up(torch.ones(1, 4, 1, 2, 2), out_channels=2, factor_t=2, factor_s=2, first_chunk=True).shape
    torch.Size([1, 2, 1, 4, 4])
    """
    repeats = out_channels * factor_t * factor_s * factor_s // x.shape[1]
    x = repeat(x, "b c t h w -> b (c r) t h w", r=repeats)  # (B, C·r, T, H, W)
    x = rearrange(
        x, "b (o ft fh fw) t h w -> b o (t ft) (h fh) (w fw)", ft=factor_t, fh=factor_s, fw=factor_s
    )  # (B, out, T·ft, H·fs, W·fs)
    return x[:, :, factor_t - 1 :] if first_chunk else x
