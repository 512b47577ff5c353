"""Measures of generated digits: grayscale views, ink fraction, and a classifier trained on real digits.

Example:
    >>> import torch
    >>> images = torch.full((2, 3, 4, 4), -1.0)
    >>> images[:, :, :2] = 1.0  # the top half white strokes
    >>> ink_fraction(images)
    0.5
"""

from __future__ import annotations

import numpy as np
import torch

from dsf.models.digits.training import digit_images


def gray(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] as grayscale (B, H, W) in [0, 1].

    >>> gray(torch.zeros(1, 3, 1, 2)).tolist()
    [[[0.5, 0.5]]]
    """
    return ((images.mean(dim=1) + 1) / 2).clamp(0, 1)


def ink_fraction(images: torch.Tensor) -> float:
    """The fraction of pixels brighter than mid-gray: how much of the image the strokes cover."""
    return float((gray(images) > 0.5).float().mean())


def real_digit_classifier(image_size: int, seed: int = 0):
    """``(classifier, held-out accuracy)``: an SVM on real digits at ``image_size`` (grayscale in [0, 1],
    flattened), fit on 75% of scikit-learn's digits drawn with ``seed``, scored on the other 25%.

    >>> classifier, accuracy = real_digit_classifier(8)
    >>> accuracy > 0.9
    True
    """
    from sklearn.svm import SVC

    images, labels = digit_images(image_size)
    features = np.stack(images).reshape(len(images), -1) / 255.0
    order = np.random.default_rng(seed).permutation(len(labels))
    split = int(0.75 * len(labels))
    train, held_out = order[:split], order[split:]
    classifier = SVC(gamma="scale", C=10.0).fit(features[train], labels[train])
    return classifier, classifier.score(features[held_out], labels[held_out])


def digit_accuracy(classifier, images: torch.Tensor, digits: np.ndarray) -> float:
    """The fraction of ``images`` (B, 3, H, W) in [-1, 1] that ``classifier`` reads as their ``digits``.

    >>> classifier, _ = real_digit_classifier(8)
    >>> from dsf.models.digits.training import digit_images
    >>> images, labels = digit_images(8)
    >>> real = torch.from_numpy(np.stack(images[:20])).float().div(127.5).sub(1).unsqueeze(1).expand(-1, 3, -1, -1)
    >>> digit_accuracy(classifier, real, labels[:20]) > 0.9
    True
    """
    return float((classifier.predict(gray(images).flatten(1).numpy()) == digits).mean())
