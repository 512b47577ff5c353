"""Accounting scoped to a ``with`` block: what a transform did (bytes fetched, tensors gathered, weights
materialized, tensors read from disk), for tests and benchmarks to check.

A :class:`Tally` holds a context variable: code that does the counted thing adds to the record of the
innermost open ``with tally.counting()``, if any, and costs nothing otherwise. Being a context variable,
a record is seen by the calls made inside the block, never by other threads' or tasks' calls.

Example:
    >>> calls = Tally("example_calls", list)
    >>> def work(name):
    ...     record = calls.current()
    ...     if record is not None:
    ...         record.append(name)
    >>> with calls.counting() as seen:
    ...     work("a"); work("b")
    >>> work("c"); seen
    ['a', 'b']
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Generic, Iterator, TypeVar

Record = TypeVar("Record")


class Tally(Generic[Record]):
    """A record made fresh by ``new`` for each ``with tally.counting()`` block, and found by :meth:`current`."""

    def __init__(self, name: str, new: Callable[[], Record]):
        self._current: contextvars.ContextVar[Record | None] = contextvars.ContextVar(f"dsf_{name}", default=None)
        self._new = new

    @contextlib.contextmanager
    def counting(self) -> Iterator[Record]:
        record = self._new()
        token = self._current.set(record)
        try:
            yield record
        finally:
            self._current.reset(token)

    def current(self) -> Record | None:
        """The record of the innermost open block, or None outside every block."""
        return self._current.get()
