"""A training paradigm is data: the transform stack wrapping the loss, and the leaves it trains.

:class:`Paradigm` holds one ``chain(...)`` of transforms (storage such as fp8, gradient
checkpointing, shards, a LoRA) and the ``where`` filter of the leaves trained: the one statement of
trainability. :func:`fit` initializes the stack on the params and trains ``stack(loss)`` over
``where`` with :func:`dsf.training.train.train`. The transforms are given as data, so the core
knows none of them: the paradigm library of a model (e.g. ``dsf.models.digits.paradigms``) and the
recipes build the stacks.

Example:
    >>> import torch, dsf
    >>> from dsf.training.train import TrainConfig
    >>> def data(position):
    ...     while True:
    ...         yield position + 1, torch.ones(2)
    >>> params = {"dit": {"w": torch.zeros(2)}, "text_encoder": {"w": torch.zeros(2)}}
    >>> everything_in_the_dit = Paradigm("full fine-tuning", dsf.chain(), r"^dit/")
    >>> config = TrainConfig(learning_rate=0.1, max_steps=5, progress=False)
    >>> trained = fit(everything_in_the_dit, lambda p, x, k: (p["dit"]["w"] - x).square().sum(), params, data, config,
    ...               key=dsf.random.key(0))
    >>> bool((trained["dit"]["w"] > 0).all()), trained["text_encoder"]["w"] is params["text_encoder"]["w"]
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsf import random
from dsf.training.train import DataStream, TrainConfig, train
from dsf.transform import Transform
from dsf.tree import Where, select


@dataclass(frozen=True)
class Paradigm:
    """A training paradigm: the transform stack wrapping the loss, and the leaves it trains (``where``).

    >>> import dsf
    >>> Paradigm("full fine-tuning", dsf.chain(), r"^dit/").where
    '^dit/'
    """

    name: str
    transforms: Transform
    where: Where

    def init(self, params, key: random.Key | None = None):
        """``params`` through the stack's ``init``; a trained leaf that the stack stores in a form that
        gets no gradient (fp8: one byte per number) is refused here, whatever the chain order.

        >>> import torch, dsf
        >>> in_fp8 = Transform(name="in_fp8", init_fn=lambda params, key=None: {"w": params["w"].to(torch.float8_e4m3fn)})
        >>> Paradigm("full fine-tuning", dsf.chain(in_fp8), "w").init({"w": torch.ones(2)})
        Traceback (most recent call last):
        ...
        ValueError: full fine-tuning cannot train 'w': the paradigm's transforms store it as torch.float8_e4m3fn, which gets no gradient; exclude it from the storage transform's where= (e.g. fp8's) or from the paradigm's where=, or train a LoRA over it instead
        """
        initialized = self.transforms.init(params, key)
        for path, leaf in select(initialized, self.where).items():
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and leaf.element_size() == 1:
                raise ValueError(
                    f"{self.name} cannot train {path!r}: the paradigm's transforms store it as {leaf.dtype}, which gets "
                    "no gradient; exclude it from the storage transform's where= (e.g. fp8's) or from the paradigm's "
                    "where=, or train a LoRA over it instead"
                )
        return initialized


@dataclass(frozen=True)
class DataFromParams:
    """A data stream that needs the initialized params, e.g. samples encoded as they are drawn by the
    text encoders and VAE that the paradigm's stack stores in fp8: ``make(initialized_params) -> DataStream``.

    >>> DataFromParams(lambda params: None).make({}) is None
    True
    """

    make: Callable[[object], DataStream]


def fit(paradigm: Paradigm, loss: Callable, params, data: DataStream | DataFromParams, config: TrainConfig, *,
        key: random.Key, **train_options):
    """``params`` through :meth:`Paradigm.init`, then ``paradigm.where`` trained on ``stack(loss)`` by
    :func:`dsf.training.train.train`; the key is split into an init key and a training key.
    ``train_options`` go to ``train`` as they are: ``optimizer=``, ``has_aux=``, ``save=``,
    ``callback=``, ``validate=`` with ``validate_every=`` (EMA is ``config.ema``). A ``validate`` sampler
    meets the initialized params: wrap it in the paradigm's stack (``paradigm.transforms(sampler)``) as the loss is.

    >>> import torch, dsf
    >>> from dsf.training import optim
    >>> def data(position):
    ...     while True:
    ...         yield position + 1, torch.ones(2)
    >>> def loss(p, x, k):
    ...     return (p["w"] - x).square().sum(), {"mean": p["w"].mean()}
    >>> config = TrainConfig(max_steps=4, progress=False, ema=0.5)
    >>> trained = fit(Paradigm("all", dsf.chain(), None), loss, {"w": torch.zeros(2)}, data, config,
    ...               key=dsf.random.key(0), optimizer=optim.sgd(0.25, momentum=0.0), has_aux=True)
    >>> [round(w, 4) for w in trained["w"].tolist()]  # four SGD steps of 0.25 on gradients clipped to norm 1
    [0.7071, 0.7071]
    """
    init_key, train_key = random.split(key)
    stack = paradigm.transforms
    initialized = paradigm.init(params, init_key)
    stream = data.make(initialized) if isinstance(data, DataFromParams) else data
    return train(stack(loss), initialized, stream, config, where=paradigm.where, key=train_key, **train_options)
