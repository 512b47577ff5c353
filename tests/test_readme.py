"""Every Python block of the README runs as written, and prints the same numbers when run again."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def printed(block: str) -> str:
    """What ``block`` prints, run in a fresh namespace."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    return out.getvalue()


def test_the_readme_carries_runnable_python():
    assert BLOCKS, "the README should carry a runnable Python example"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_each_block_runs_and_prints_the_same_numbers_twice(block):
    first = printed(block)
    assert re.search(r"\d", first), f"the block prints no number to compare:\n{block}"
    assert printed(block) == first
