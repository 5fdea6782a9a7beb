# Invariants: liveness says only that the event loop answers; readiness runs every registered
# check (each bounded by ``CHECK_TIMEOUT_SECONDS``) and is ready only when all of them are. A
# check returns None when ready, else a short reason (no secrets: it is served unauthenticated).
"""Health: ``/healthz/live``, ``/healthz/ready`` (and ``/healthz``), with pluggable checks."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

__all__ = ["CHECK_TIMEOUT_SECONDS", "Readiness", "ReadyCheck", "SupportsReady"]

log = logging.getLogger("relay.health")

CHECK_TIMEOUT_SECONDS = 5.0

#: A readiness check: None when ready, else why not.
ReadyCheck = Callable[[], Awaitable[str | None]]


@runtime_checkable
class SupportsReady(Protocol):
    """A component (store, replay guard, broker) that can say whether it is ready."""

    async def ready(self) -> str | None:
        """Return None when ready, else a short reason."""
        ...


@dataclass(slots=True)
class Readiness:
    """The named readiness checks of one relay process.

    Other backends register theirs with ``add`` (e.g. ``("postgres", pool_check)``) before the
    app starts serving.
    """

    checks: list[tuple[str, ReadyCheck]] = field(default_factory=list)

    def add(self, name: str, check: ReadyCheck) -> None:
        """Register ``check`` under ``name`` (names are shown in the readiness document)."""
        self.checks.append((name, check))

    def add_component(self, name: str, component: object) -> None:
        """Register ``component.ready`` if it has one (``SupportsReady``); else nothing."""
        if isinstance(component, SupportsReady):
            self.add(name, component.ready)

    async def run(self) -> tuple[bool, dict[str, str]]:
        """Run every check concurrently.

        Returns:
            (all ready, name -> ``"ok"`` or the reason).
        """

        async def one(name: str, check: ReadyCheck) -> tuple[str, str | None]:
            try:
                return name, await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
            except TimeoutError:
                return name, f"check did not answer within {CHECK_TIMEOUT_SECONDS:.0f} s"
            except Exception as exc:  # noqa: BLE001 -- a failing check is "not ready", never a 500
                log.error("readiness check %s failed: %s", name, type(exc).__name__)
                return name, f"check failed: {type(exc).__name__}"

        results = await asyncio.gather(*(one(n, c) for n, c in self.checks))
        report = {name: reason or "ok" for name, reason in results}
        return all(reason is None for _, reason in results), report
