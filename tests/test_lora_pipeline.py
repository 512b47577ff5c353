"""`lora` on a whole pipeline's tree adapts its denoiser unless `where=` names another part; digits helpers import."""

import pytest
import torch

import dsf
from dsf.models.flux.tiny import tiny_pipeline
from dsf.transforms import lora
from dsf.transforms.lora import linear_weight_shapes


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def adapted_parts(params) -> set[str]:
    return {path.partition("/")[0] for path in dsf.tree.paths(params) if "/adapt/adapters/" in path}


def test_attention_targets_on_a_pipeline_tree_adapt_the_denoiser_only(pipe):
    vae_attention = [path for path in linear_weight_shapes(pipe.params) if path.startswith("vae/") and "to_q" in path]
    assert vae_attention  # the VAE has attention the targets would match
    params = lora(rank=2, targets="to_q,to_k,to_v,to_out.0").init(pipe.params, dsf.random.key(0))
    assert adapted_parts(params) == {"dit"}


def test_every_linear_weight_of_a_pipeline_tree_means_the_denoisers(pipe):
    assert adapted_parts(lora(rank=2).init(pipe.params, dsf.random.key(0))) == {"dit"}


def test_where_names_other_parts_explicitly(pipe):
    params = lora(rank=2, where=r"^(dit|vae)/", targets="to_q").init(pipe.params, dsf.random.key(0))
    assert adapted_parts(params) == {"dit", "vae"}


def test_the_digits_helpers_import_from_the_digits_package():
    from dsf.models.digits import SCHEDULE, digit_accuracy, ink_fraction, real_digit_classifier
    from dsf.models.digits.training import digits_loss  # trains with the same schedule object
    from dsf.models.digits import pipeline

    assert SCHEDULE is pipeline.SCHEDULE and callable(digits_loss)
    white = torch.ones(1, 3, 4, 4)
    assert ink_fraction(white) == 1.0 and ink_fraction(-white) == 0.0
    assert callable(digit_accuracy) and callable(real_digit_classifier)
