"""The distributed tests' worker pool: 4 gloo ranks on 127.0.0.1, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import fdp.launch

POOL_SIZE = 4  # the largest mesh the property tests draw (2 cores: 1 thread per rank)


@pytest.fixture(scope="session")
def pool() -> Iterator[fdp.launch.Pool]:
    """A :class:`fdp.launch.Pool`; every job gets the subgroup of the ranks it runs on."""
    with fdp.launch.Pool(POOL_SIZE, timeout=120) as p:
        yield p
