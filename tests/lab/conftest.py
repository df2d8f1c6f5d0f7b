"""Fixtures of the lab tests: one `kiln labs simulate` for the session on a loopback port, its switches put back to
their defaults before each test, and a callback receiver per test that verifies what it gets as kiln does.
"""

from __future__ import annotations

import pytest

from tests.lab.support import CallbackReceiver, Simulator, Windows, simulator


@pytest.fixture(scope="session")
def running_lab():
    with simulator() as lab:
        yield lab


@pytest.fixture
def lab(running_lab: Simulator) -> Simulator:
    """The session's simulator with every switch at its default (a test's configure() replaces them whole)."""
    running_lab.configure()
    return running_lab


@pytest.fixture(scope="session")
def windows() -> Windows:
    return Windows()


@pytest.fixture
def hooks(lab: Simulator):
    with CallbackReceiver(lab.secret) as receiver:
        yield receiver
