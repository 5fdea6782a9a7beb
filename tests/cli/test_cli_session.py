"""The CLI session's bounded waits (what every command and daemon call awaits).

A wait ends with the timeout's status (3) after ``--network-timeout``, and at once with
10 when another program takes this device's relay connection; an error of the awaited
call itself comes through unchanged. A real relay process and a real account.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from cli_harness import BLINDPOST, Cli, Relay

from tui_client.cli import EXIT_BUSY, EXIT_UNREACHABLE, CliError
from tui_client.cli.output import Output
from tui_client.cli.session import _account, _Settings


def _settings(data: Path, timeout: float) -> _Settings:
    return _Settings(data, Output(True), None, timeout)


def test_a_wait_times_out_and_the_call_s_own_errors_come_through(cli: Cli, relay: Relay) -> None:
    cli("wsam", "init", "wsam", "--relay", relay.url)

    async def run() -> None:
        async with _account(_settings(cli.data("wsam"), 0.5), connect=True) as session:
            never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            with pytest.raises(CliError) as caught:
                await session.bounded(never, "nothing")
            assert caught.value.code == EXIT_UNREACHABLE
            assert "waiting for nothing" in str(caught.value)
            assert never.cancelled()  # the abandoned call is cancelled, not left running

            async def fails() -> None:
                raise TimeoutError("the call's own")

            with pytest.raises(TimeoutError, match="the call's own"):
                await session.bounded(fails(), "a call that fails")
            assert await session.bounded(asyncio.sleep(0, "done"), "a quick call") == "done"

    asyncio.run(run())


def test_a_wait_ends_at_once_when_another_program_takes_the_device(
    cli: Cli, relay: Relay, tmp_path: Path
) -> None:
    cli("wtom", "init", "wtom", "--relay", relay.url)
    copy = tmp_path / "copy"
    shutil.copytree(cli.data("wtom"), copy)

    async def run() -> None:
        async with _account(_settings(cli.data("wtom"), 60.0), connect=False) as session:
            await session.connect(receive=True)  # holds the device's socket, as the daemon does
            never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def caller() -> CliError:
                try:
                    await session.bounded(never, "nothing")
                except CliError as exc:
                    # Not left cancelled: the task goes on normally after the error.
                    await asyncio.sleep(0)
                    return exc
                raise AssertionError("the wait ended without an error")

            waiting = asyncio.ensure_future(caller())
            other = await asyncio.create_subprocess_exec(
                str(BLINDPOST), "--data", str(copy), "receive", env=cli.env
            )
            try:
                error = await asyncio.wait_for(waiting, 30)
            finally:
                await other.wait()
            assert error.code == EXIT_BUSY
            assert never.cancelled()

    asyncio.run(run())
