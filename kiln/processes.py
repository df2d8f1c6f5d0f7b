"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals) -> None:
    """In a child before exec (a preexec_fn): the kernel sends it `sig` when its parent dies, however that dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
