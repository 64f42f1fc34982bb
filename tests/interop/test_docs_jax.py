"""docs/jax.md: its ```py blocks (which need JAX) run, sharing one namespace."""

from __future__ import annotations

import pathlib
import re

import pytest

pytest.importorskip("jax")

PAGE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "jax.md"


def test_jax_page_snippets_run():
    blocks = re.findall(r"```py\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {"__name__": "docs_jax"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"jax.md[py block {i}]", "exec"), namespace)
        except Exception as e:  # re-raised with the block named
            raise AssertionError(f"jax.md, py block {i} failed: {e!r}") from e
