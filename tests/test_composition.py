"""Composition laws of the standard transforms on the tiny FLUX.1 DiT.

Every order of chain(lora, fp8, offload, checkpoint, compile) gives the same loss, LoRA gradients
and samples, bit for bit, and compiled equals eager within 1e-5 relative; the chain equals applying
the transforms by hand; one transform object wraps both the sampler and the loss.
"""

import itertools

import pytest
import torch

import dsf
from dsf.diffusion.losses import flow_matching_loss
from dsf.models import flux
from dsf.diffusion.sampling import sample
from dsf.diffusion.schedules import FLUX1
from dsf.transforms import checkpoint, compile, fp8, lora, lora_trainable, offload

CONFIG = flux.FluxConfig(num_heads=2, head_dim=16, axes_dims_rope=(4, 6, 6), num_double_blocks=2,
                         num_single_blocks=2, context_dim=32, pooled_dim=16)
DIT = flux.FluxDiT(CONFIG)
K = dsf.random.split(dsf.random.key(0), 6)
LATENTS = dsf.random.normal(K[0], (2, 16, 4, 4))
COND = {
    "text_embeds": dsf.random.normal(K[1], (2, 5, 32)),
    "pooled_embeds": dsf.random.normal(K[2], (2, 16)),
    "guidance": torch.full((2,), 3.5),
}


def velocity(params, x, sigma, **cond):
    return DIT(params, x, sigma, **cond)


def loss(params, key):
    return flow_matching_loss(velocity, params, LATENTS, key, COND, schedule=FLUX1)


def sampler(params, noise):
    return sample(velocity, params, noise, FLUX1.sigmas(3), COND, progress=False)


def standard_transforms():
    return {
        "lora": lora(rank=4, targets="to_q,to_k,to_v,to_out.0,proj_mlp"),
        "fp8": fp8(where=r"^(transformer_blocks|single_transformer_blocks)/", compute_dtype=torch.float32),
        "offload": offload(device="cpu"),
        "checkpoint": checkpoint(),
    }


def with_trained_lora(params):
    """Non-zero LoRA up factors (as after some training), the same whatever the chain order."""
    def fill(path, x):
        return dsf.random.normal(dsf.random.key(len(path)), x.shape) * 0.1 if path.endswith("/up") else x

    return dsf.tree.map_with_path(fill, params)


@pytest.fixture(scope="module")
def base():
    return flux.init_dit(CONFIG, K[3])


def run(transform, params):
    params = with_trained_lora(transform.init(params, K[4]))
    value, grads = dsf.value_and_grad(transform(loss), where=lora_trainable)(params, K[5])
    with torch.no_grad():
        samples = transform(sampler)(params, LATENTS)
    return value, dsf.tree.tensors(grads), samples


def assert_identical(a, b):
    value_a, grads_a, samples_a = a
    value_b, grads_b, samples_b = b
    assert torch.equal(value_a, value_b)
    assert len(grads_a) == len(grads_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b))
    assert torch.equal(samples_a, samples_b)


def test_every_order_gives_the_same_loss_gradients_and_samples(base):
    """Every order of the four, with compile at every position in turn (compile has no init, so its
    position changes nothing else; running all 120 orders would only repeat runs)."""
    names = list(standard_transforms())
    reference = run(dsf.chain(*standard_transforms().values(), compile()), base)
    assert reference[1][0].abs().sum() > 0
    for i, order in enumerate(itertools.permutations(names)):
        transforms = standard_transforms()
        chain = [transforms[n] for n in order]
        chain.insert(i % (len(chain) + 1), compile())
        assert_identical(run(dsf.chain(*chain), base), reference)


def assert_close(a, b, rtol=1e-5):
    def close(x, y):
        return float((x - y).abs().max()) <= rtol * float(y.abs().max())

    (value_a, grads_a, samples_a), (value_b, grads_b, samples_b) = a, b
    assert close(value_a, value_b) and close(samples_a, samples_b)
    assert len(grads_a) == len(grads_b) > 0 and all(close(x, y) for x, y in zip(grads_a, grads_b))


def test_compiled_equals_eager_within_1e_5(base):
    eager = run(dsf.chain(*standard_transforms().values()), base)
    compiled = run(dsf.chain(*standard_transforms().values(), compile()), base)
    assert_close(compiled, eager)
    assert not torch.equal(compiled[2], eager[2])  # inductor's kernels ran, not the eager ones


def test_chain_equals_applying_the_transforms_by_hand(base):
    transforms = [*standard_transforms().values(), compile()]
    chained = run(dsf.chain(*transforms), base)

    params = base
    for t in transforms:
        params = t.init(params, K[4])
    params = with_trained_lora(params)
    by_hand_loss, by_hand_sampler = loss, sampler
    for t in transforms:
        by_hand_loss, by_hand_sampler = t(by_hand_loss), t(by_hand_sampler)
    value, grads = dsf.value_and_grad(by_hand_loss, where=lora_trainable)(params, K[5])
    with torch.no_grad():
        samples = by_hand_sampler(params, LATENTS)
    assert_identical((value, dsf.tree.tensors(grads), samples), chained)


def test_the_stack_changes_the_function_only_through_fp8(base):
    """lora (B = 0), offload to the same device and checkpoint are identities; fp8 alone changes numbers."""
    identities = dsf.chain(lora(rank=4, targets="to_q"), offload(device="cpu"), checkpoint())
    params = identities.init(base, K[4])
    assert torch.equal(identities(loss)(params, K[5]), loss(base, K[5]))
    stored = fp8(compute_dtype=torch.float32)
    quantized = stored.init(base, K[4])
    plain, approx = loss(base, K[5]), stored(loss)(quantized, K[5])
    assert not torch.equal(plain, approx) and abs(approx - plain) / plain < 0.05
