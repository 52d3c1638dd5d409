"""A service that runs in the daemon's event loop: started with it, closed with it.

The DNS stub and the mail service each have a ``start(config)`` coroutine that binds their
listeners in the running loop and returns an object with ``async close()``;
:class:`HostedService` plugs such a pair into ``chroot-helper serve``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from ..errors import ConfigError
from ..server import Service


class Closable(Protocol):
    async def close(self) -> None: ...


ConfigT = TypeVar("ConfigT")
RunningT = TypeVar("RunningT", bound=Closable)


class HostedService(Service, Generic[ConfigT, RunningT]):
    """Starts ``starter(config)`` with the daemon (before it drops capabilities) and closes it.

    :param name: the configuration table, e.g. ``"dns"``.
    :param config: that table, validated.
    :param starter: binds the listeners in the running loop and returns the running service.
    """

    def __init__(
        self, name: str, config: ConfigT, starter: Callable[[ConfigT], Awaitable[RunningT]]
    ) -> None:
        self.name = name
        self.config = config
        self._starter = starter
        self.running: RunningT | None = None

    async def start(self) -> None:
        self.running = await self._starter(self.config)

    async def stop(self) -> None:
        if self.running is not None:
            await self.running.close()
            self.running = None


def refuse_workers(table: str, workers: int) -> None:
    """``workers > 1`` forks processes, which only the service's standalone runner does."""
    if workers > 1:
        raise ConfigError(
            f"{table}.workers = {workers}: inside chroot-helper serve the {table} service runs in "
            f"the daemon's own loop; remove {table}.workers, or run it alone with "
            f"'python -m chroot_helper.services.{table} --config FILE' for several workers"
        )
