"""JAX test setup: 8 forced host devices for ``jax.pmap``, before any JAX backend starts.

XLA reads ``XLA_FLAGS`` when JAX initializes its CPU backend (on first use, not on import), and
pytest imports this file while collecting, before any test runs. Only JAX reads the flag, so
other tests are unaffected. The ``host_devices`` fixture skips, naming the cause, when a backend
was started earlier with fewer devices.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

HOST_DEVICES = 8
_FLAG = "--xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={HOST_DEVICES}".strip()


@pytest.fixture(scope="session")
def host_devices() -> list:
    """The JAX CPU devices (at least ``HOST_DEVICES``)."""
    jax = pytest.importorskip("jax")
    devices = jax.devices("cpu")
    if len(devices) < HOST_DEVICES:
        pytest.skip(f"JAX started with {len(devices)} CPU device(s) before tests/interop's "
                    f"conftest set XLA_FLAGS={_FLAG}={HOST_DEVICES}; run with that variable set")
    return devices


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Reports the largest fdp-vs-JAX relative error the oracle tests measured."""
    oracle = sys.modules.get("tests.interop.test_oracle")
    errors = getattr(oracle, "RELATIVE_ERRORS", None)
    if errors:
        terminalreporter.write_line(f"fdp vs JAX oracle (float64): {len(errors)} comparisons, "
                                    f"max relative error {max(errors):.2e}")
