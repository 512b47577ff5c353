"""argparse types that refuse impossible values at parse time, with the flag and the value in the message.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(exit_on_error=False)
    >>> _ = parser.add_argument("--max_steps", type=positive_int)
    >>> _ = parser.add_argument("--cfg_scale", type=finite_float)
    >>> parser.parse_args(["--max_steps", "3", "--cfg_scale", "2.5"])
    Namespace(max_steps=3, cfg_scale=2.5)
    >>> parser.parse_args(["--max_steps", "0"])
    Traceback (most recent call last):
    ...
    argparse.ArgumentError: argument --max_steps: must be a positive integer, got '0'
"""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer of at least 1 (steps, sizes, counts).

    >>> positive_int("4")
    4
    """
    value = _parsed(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0 (warmup steps, seeds).

    >>> non_negative_int("0")
    0
    """
    value = _parsed(int, text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (scales, rates, boundaries).

    >>> finite_float("1e-4")
    0.0001
    """
    value = _parsed(float, text, "a finite number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _parsed(kind, text: str, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
