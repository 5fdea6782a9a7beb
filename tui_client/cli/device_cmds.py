# Invariants:
# * `link` writes nothing into --data until a grant arrived and opened: a code that is never
#   approved, times out or brings a bad grant leaves the directory as it was (and nothing is
#   registered at the relay for it).
# * The link code is printed as the line `code: CODE` (and a QR code of the same text) before
#   the command waits, flushed, so a script can read it while `link` is still running.
# * `devices` prints one record per device; `devices add` and `devices remove` one record.
"""Linked devices: `link` (the new machine) and `devices [add CODE | remove ID]`."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from e2ee.client import DB_FILE, Client, DeviceRecord, LinkGrant, PendingLink
from e2ee.client_errors import InvalidLinkGrant, LinkNotApproved, RateLimited
from e2ee.errors import TransportError
from tui_client.cli.checks import _relay_urls
from tui_client.cli.exits import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from tui_client.cli.output import format_time
from tui_client.cli.session import _OPTIONS, _account, _Settings, _write_cursor

DEFAULT_LINK_TIMEOUT = 300.0


def _link_code_text(code: str, timeout: float) -> str:
    from e2ee.qr import qr_terminal

    return "\n".join(
        [
            f"code: {code}",
            qr_terminal(code.encode("ascii")),
            "on a device that already has this account, run: blindpost devices add CODE",
            f"(or scan the QR code in the app); waiting up to {timeout:g} s",
        ]
    )


async def cmd_link(settings: _Settings, args: argparse.Namespace) -> int:
    relays = _relay_urls(args.relay)
    timeout: float = args.timeout
    if timeout <= 0:
        raise CliError(EXIT_USAGE, "--timeout must be positive")
    folder: Path = settings.data_dir
    if (folder / DB_FILE).exists():
        raise CliError(EXIT_USAGE, f"{folder} already holds an account: link into a new one")
    try:
        pending = await asyncio.wait_for(PendingLink.start(relays), settings.network_timeout)
    except RateLimited as exc:
        raise CliError(
            EXIT_REFUSED, f"too many links started from here; try again in {exc.retry_after} s"
        ) from None
    except (TimeoutError, TransportError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
        raise CliError(
            EXIT_UNREACHABLE, f"cannot reach the relay at {relays[0]} ({reason})"
        ) from None
    try:
        code = pending.code.text()
        settings.out.emit(
            {"type": "link_code", "code": code, "expires_at": pending.expires_at},
            _link_code_text(code, timeout),
        )
        try:
            grant = await pending.wait(timeout)
        except LinkNotApproved as exc:
            raise CliError(
                EXIT_UNREACHABLE, f"{exc}; nothing was registered: run 'link' again"
            ) from None
        except InvalidLinkGrant as exc:
            raise CliError(EXIT_REFUSED, f"refused what arrived: {exc}; run 'link' again") from None
    finally:
        await pending.aclose()
    try:
        client = await Client.link_device(
            folder, grant, pending.keys, passphrase=settings.passphrase, options=_OPTIONS
        )
    except TransportError as exc:
        raise CliError(
            EXIT_UNREACHABLE,
            f"linked as {grant.username} (device {grant.device_id}), but the keys could not be "
            f"uploaded ({exc}); run 'blindpost --data {folder} init {grant.username} --relay "
            f"{grant.relay_urls[0]}' to finish",
        ) from None
    try:
        seq = await asyncio.to_thread(client.history.max_seq, "messages")
        await asyncio.to_thread(_write_cursor, folder, seq)
    finally:
        await client.close()
    record = {
        "type": "account",
        "username": grant.username,
        "device": grant.device_id,
        "name": grant.device_name,
        "relay": grant.relay_urls[0],
        "relays": list(grant.relay_urls),
        "data": str(folder),
        "fingerprint": client.fingerprint,
        "linked": True,
        "history": bool(grant.history_blob),
    }
    settings.out.emit(
        record,
        f"linked as {grant.username} (device {grant.device_id}) at {grant.relay_urls[0]}\n"
        f"data: {folder}\n"
        + ("history: handed over from the approving device\n" if grant.history_blob else "")
        + "check the username: it is the account this machine now belongs to",
    )
    return EXIT_OK


def device_added_record(grant: LinkGrant) -> dict[str, Any]:
    """The `devices add` record (the CLI's --json line, the daemon's result)."""
    return {
        "type": "device_added",
        "id": grant.device_id,
        "name": grant.device_name,
        "username": grant.username,
        "history": bool(grant.history_blob),
    }


def device_record(d: DeviceRecord) -> dict[str, Any]:
    """One `devices` record (the CLI's --json line, an item of the daemon's result)."""
    return {
        "type": "device",
        "id": d.device_id,
        "name": d.name,
        "added": d.created_at,
        "last_seen": d.last_seen,
        "this_device": d.this_device,
    }


def check_removal(client: Client, device_id: int, force: bool) -> None:
    """Refuse to remove this device itself unless forced (it would be logged out).

    Raises:
        CliError: (2) ``device_id`` is this device and ``force`` is False.
    """
    if device_id == client.device_id and not force:
        raise CliError(
            EXIT_USAGE,
            "that is this device: it would be logged out (add --force to do it anyway)",
        )


async def cmd_devices(settings: _Settings, args: argparse.Namespace) -> int:
    action = getattr(args, "devices_command", None) or "list"
    async with _account(settings, connect=False) as session:
        devices = session.client.devices
        if action == "add":
            # The history hand-over is a transfer: it may take longer than one request.
            grant = await devices.approve(
                args.code, name=args.name or "", with_history=args.with_history
            )
            record = device_added_record(grant)
            named = f" ({grant.device_name})" if grant.device_name else ""
            settings.out.emit(
                record,
                f"approved device {grant.device_id}{named} for {grant.username}; "
                "it finishes setting itself up",
            )
            return EXIT_OK
        if action == "remove":
            check_removal(session.client, args.device_id, args.force)
            await asyncio.wait_for(devices.remove(args.device_id), settings.network_timeout)
            settings.out.emit(
                {"type": "device_removed", "id": args.device_id},
                f"removed device {args.device_id}; it reads nothing sent from now on",
            )
            return EXIT_OK
        if action != "list":
            raise CliError(EXIT_ERROR, f"unknown devices action {action!r}")
        listed = await asyncio.wait_for(devices.list(), settings.network_timeout)
    for d in listed:
        record = device_record(d)
        this = "  (this device)" if d.this_device else ""
        human = (
            f"{d.device_id:>3}  {d.name or '-':<20}  added {format_time(d.created_at)}  "
            f"last seen {format_time(d.last_seen)}{this}"
        )
        settings.out.emit(record, human)
    return EXIT_OK
