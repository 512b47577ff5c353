"""Comparing two training runs after an optimizer, the same way on every machine.

AdamW divides each gradient by its running magnitude, so an element whose gradient is near zero
moves by about the learning rate whatever its sign: a last-bit difference in such a gradient (another
summation order, another BLAS kernel on another CPU) becomes a learning-rate-sized difference in one
weight. Runs that do the same arithmetic agree bit for bit; runs that claim the same training by
other arithmetic (two ranks against accumulation, a batch against micro-batches) are compared on
what the claim is about: each tensor's update, by its relative norm. A wrong training (a lost
micro-batch, a wrong average) changes the update by tens of percent; last-bit noise amplified in a
few elements changes it by about 1e-4.
"""

from __future__ import annotations

import torch  # noqa: F401 (the examples use it)

UPDATE_TOLERANCE = 1e-3  # relative norm of the difference of two updates


def assert_same_updates(trained: dict, reference: dict, initial: dict, tolerance: float = UPDATE_TOLERANCE) -> None:
    """Each tensor of ``trained`` moved from ``initial`` as ``reference`` did, within ``tolerance`` in relative norm.

    >>> start = {"w": torch.zeros(4)}
    >>> assert_same_updates({"w": torch.tensor([1.0, 1, 1, 1.0001])}, {"w": torch.ones(4)}, start)
    >>> assert_same_updates({"w": torch.tensor([1.0, 1, 1, -1])}, {"w": torch.ones(4)}, start)
    Traceback (most recent call last):
    ...
    AssertionError: w: the update differs from the reference's by 1 of its norm (allowed 0.001)
    """
    assert sorted(trained) == sorted(reference) and len(reference) > 0
    for key, expected in reference.items():
        update, expected_update = trained[key].float() - initial[key].float(), expected.float() - initial[key].float()
        assert expected_update.norm() > 0, f"{key}: the reference run did not change it"
        difference = float((update - expected_update).norm() / expected_update.norm())
        if difference > tolerance:
            raise AssertionError(
                f"{key}: the update differs from the reference's by {difference:.3g} of its norm (allowed {tolerance:g})"
            )
