import torch

from dsf import random


def test_same_seed_same_numbers_bit_for_bit():
    a = random.normal(random.key(3), (4, 5))
    b = random.normal(random.key(3), (4, 5))
    assert torch.equal(a, b)


def test_split_and_fold_in_give_distinct_keys():
    k = random.key(0)
    keys = set(random.split(k, 8)) | {random.fold_in(k, i) for i in range(8)} | {k}
    assert len(keys) == 17
    assert random.split(k, 3) == random.split(k, 3)


def test_draws_from_different_keys_differ():
    a, b = random.split(random.key(0))
    assert not torch.equal(random.normal(a, (16,)), random.normal(b, (16,)))


def test_dtype_and_device_only_cast_the_same_draw():
    k = random.key(1)
    assert torch.equal(random.normal(k, (8,), dtype=torch.bfloat16), random.normal(k, (8,)).to(torch.bfloat16))


def test_uniform_range_and_randint_bounds():
    u = random.uniform(random.key(2), (1000,), -2.0, 3.0)
    assert u.min() >= -2 and u.max() < 3
    r = random.randint(random.key(2), 5, 9, (1000,))
    assert set(r.tolist()) == {5, 6, 7, 8}


def test_normal_statistics():
    x = random.normal(random.key(4), (100_000,))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
