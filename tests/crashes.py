"""Crash injection through the repository's test seam (``triton_repo.set_crash_hook``):
production code calls ``crash_point`` after each journalled step and carries no crash parameter."""

from __future__ import annotations

from contextlib import contextmanager

from fraudlib import triton_repo


class InjectedCrash(BaseException):
    """A simulated crash: no rollback handler catches a BaseException, so what was done stays done."""


@contextmanager
def crash_after(point: str):
    """Within the block, the process "crashes" right after ``point`` (``"<op>.<step>"``)."""
    def hook(reached: str) -> None:
        if reached == point:
            raise InjectedCrash(f"injected crash after {reached}")

    triton_repo.set_crash_hook(hook)
    try:
        yield
    finally:
        triton_repo.set_crash_hook(None)
