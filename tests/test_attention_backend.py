"""Attention runs through ``F.scaled_dot_product_attention`` and nothing forces its math backend, so
on a GPU torch picks flash or memory-efficient kernels."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsf
from dsf.models import flux, wan

ROOT = Path(__file__).resolve().parents[1]
FORCING = re.compile(r"sdpa_kernel|sdp_kernel|SDPBackend|enable_(math|flash|mem_efficient|cudnn)_sdp|\.softmax\(|softmax\(")


def test_no_library_file_forces_a_backend_or_writes_attention_by_hand():
    files = [p for folder in ("dsf", "models", "transforms", "recipes") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 20
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if FORCING.search(line)]
    assert offenders == []


def _flux_velocity():
    config = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2,
                             num_single_blocks=3, context_dim=8, pooled_dim=8, guidance_embeds=False)
    params = flux.init_dit(config, dsf.random.key(0))
    return lambda: flux.FluxDiT(config)(params, torch.randn(1, 16, 2, 2), torch.rand(1), torch.randn(1, 3, 8),
                                        torch.randn(1, 8)), 2 + 3


def _wan_velocity():
    config = wan.WanConfig(num_heads=1, head_dim=12, ffn_dim=8, num_layers=2, text_dim=8, text_len=3)
    params = wan.init_dit(config, dsf.random.key(0))
    return lambda: wan.apply(params, torch.randn(1, 16, 1, 2, 2), torch.rand(1), torch.randn(1, 3, 8), config=config), 2 * 2


@pytest.mark.parametrize("make", [_flux_velocity, _wan_velocity], ids=["flux", "wan"])
def test_every_attention_of_a_dit_is_sdpa(make, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return torch.ops.aten.scaled_dot_product_attention(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    velocity, attentions = make()
    velocity()
    assert len(calls) == attentions  # flux: one joint attention per block; wan: self and cross per block
