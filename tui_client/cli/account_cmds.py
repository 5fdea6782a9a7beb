# Invariants:
# * A recovery key is printed once, when it is made (`init`, `recover`, `recovery-key`), and
#   never stored; it is read from --recovery-key-file or standard input, never from argv
#   (where other users of the machine could see it in the process list).
# * `backup restore` writes nothing into --data unless the whole backup authenticated; a
#   failed `recover` leaves no account files behind in a directory it created them in.
"""Account recovery, encrypted backups and sealed sender settings: `recover`, `recovery-key`,
`backup`, `sealed`."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from pathlib import Path
from typing import Any

from e2ee.client import DB_FILE, Client, SealedSender
from e2ee.client.backup import BackupInfo
from e2ee.client_errors import InvalidRecoveryKey, RateLimited, RecoveryRefused
from e2ee.errors import TransportError, WrongPassphrase
from tui_client.cli.checks import _username
from tui_client.cli.exits import (
    ENV_PASSPHRASE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_PASSPHRASE,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from tui_client.cli.session import (
    _OPTIONS,
    _account,
    _remove_account_files,
    _Settings,
    _write_cursor,
)


def _recovery_key_lines(key: str, user: str) -> list[str]:
    return [
        f"recovery key (shown once; write it down, keep it offline): {key}",
        f"  it re-claims {user} on a new device if every device is lost: "
        "'blindpost --data DIR recover " + user + " --relay URL'",
    ]


async def _first_recovery_key(client: Client, settings: _Settings, relay: str) -> str | None:
    """A new recovery key for an account that has none yet (None when it has one)."""
    if client.recovery.has_key:
        return None
    try:
        return await asyncio.wait_for(client.recovery.new_key(), settings.network_timeout)
    except (TimeoutError, TransportError) as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
        raise CliError(
            EXIT_UNREACHABLE,
            f"registered, but the recovery key could not be set at {relay} ({reason}); "
            "run the same 'init' again to finish",
        ) from None


def _read_recovery_key(args: argparse.Namespace) -> str:
    path: Path | None = args.recovery_key_file
    try:
        text = path.read_text("utf-8") if path is not None else sys.stdin.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(EXIT_USAGE, f"cannot read the recovery key: {exc}") from exc
    text = text.strip()
    if not text:
        raise CliError(EXIT_USAGE, "no recovery key given (--recovery-key-file or stdin)")
    return text


async def cmd_recover(settings: _Settings, args: argparse.Namespace) -> int:
    user = _username(args.username)
    relay: str = args.relay.rstrip("/")
    if not re.match(r"^https?://[^/\s]+", relay):
        raise CliError(EXIT_USAGE, f"invalid relay URL {args.relay!r}: use http(s)://host:port")
    key = _read_recovery_key(args)
    folder = settings.data_dir
    if (folder / DB_FILE).exists():
        raise CliError(EXIT_USAGE, f"{folder} already holds an account: recover into a new one")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot create {folder}: {exc.strerror}") from exc
    client = await Client.create(
        folder, user, relay, passphrase=settings.passphrase, options=_OPTIONS
    )
    done = False
    try:
        try:
            await asyncio.wait_for(client.recovery.recover(key), settings.network_timeout)
        except InvalidRecoveryKey as exc:
            raise CliError(EXIT_USAGE, str(exc)) from None
        except RecoveryRefused:
            raise CliError(
                EXIT_REFUSED, f"the relay at {relay} refused the recovery key for {user!r}"
            ) from None
        except RateLimited as exc:
            raise CliError(
                EXIT_REFUSED,
                f"too many recovery attempts for {user!r}; try again in {exc.retry_after} s",
            ) from None
        except (TimeoutError, TransportError) as exc:
            reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
            raise CliError(EXIT_UNREACHABLE, f"cannot recover at {relay} ({reason})") from None
        done = True
        new_key = await _first_recovery_key(client, settings, relay)
        seq = await asyncio.to_thread(client.history.max_seq, "messages")
        await asyncio.to_thread(_write_cursor, folder, seq)
    finally:
        await client.close()
        if not done:
            _remove_account_files(folder)
    record = {
        "type": "account",
        "username": user,
        "device": client.device_id,
        "relay": relay,
        "data": str(folder),
        "fingerprint": client.fingerprint,
        "recovered": True,
        "recovery_key": new_key,
    }
    lines = [
        f"recovered {user} (device {client.device_id}) at {relay}",
        f"data: {folder}",
        "this is a new identity: contacts see your safety number change",
    ]
    if new_key is not None:
        lines += _recovery_key_lines(new_key, user)
    settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


def recovery_key_record(user: str, key: str) -> dict[str, Any]:
    """The `recovery-key` record (the CLI's --json line, the daemon's result)."""
    return {"type": "recovery_key", "username": user, "recovery_key": key}


def backup_record(info: BackupInfo) -> dict[str, Any]:
    """The record of a backup written (the CLI's --json line, the daemon's result)."""
    return {
        "type": "backup",
        "path": str(info.path),
        "username": info.username,
        "size": info.size,
        "media": info.media_files,
        "skipped": False,
    }


async def cmd_recovery_key(settings: _Settings, args: argparse.Namespace) -> int:
    async with _account(settings, connect=False) as session:
        client = session.client
        key = await asyncio.wait_for(client.recovery.new_key(), settings.network_timeout)
        user = client.username
    record = recovery_key_record(user, key)
    lines = ["the earlier recovery key no longer works", *_recovery_key_lines(key, user)]
    settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


#: `sealed` actions: what each one tells the user it did ("status" changes nothing).
SEALED_ACTIONS = {
    "status": "",
    "refuse": "sealed messages refused: contacts' messages now come with their name\n",
    "accept": "sealed messages from contacts accepted\n",
    "rotate": "new access key: contacts get it with your next message to each\n",
}


async def apply_sealed(sealed: SealedSender, action: str, timeout: float) -> dict[str, Any]:
    """Do a `sealed` action (one of ``SEALED_ACTIONS``); return the `sealed` record after it
    (the CLI's --json line, the daemon's result)."""
    if action == "refuse":
        await asyncio.wait_for(sealed.refuse(), timeout)
    elif action == "accept":
        await asyncio.wait_for(sealed.accept(), timeout)
    elif action == "rotate":
        await asyncio.wait_for(sealed.rotate_access_key(), timeout)
    return {"type": "sealed", "sending": sealed.sending, "accepting": sealed.accepting}


async def cmd_sealed(settings: _Settings, args: argparse.Namespace) -> int:
    action = getattr(args, "sealed_command", None) or "status"
    async with _account(settings, connect=False) as session:
        record = await apply_sealed(session.client.sealed, action, settings.network_timeout)
    done = SEALED_ACTIONS[action]
    human = (
        f"{done}sending sealed: {'yes' if record['sending'] else 'no'}; "
        f"accepting sealed from contacts: {'yes' if record['accepting'] else 'no'}"
    )
    settings.out.emit(record, human)
    return EXIT_OK


def _backup_passphrase(settings: _Settings) -> str:
    if settings.passphrase is None:
        raise CliError(
            EXIT_PASSPHRASE,
            "a backup needs a passphrase: give it with --passphrase-file FILE or "
            f"${ENV_PASSPHRASE}",
        )
    return settings.passphrase


async def cmd_backup(settings: _Settings, args: argparse.Namespace) -> int:
    if args.backup_command == "create":
        return await _backup_create(settings, args)
    return await _backup_restore(settings, args)


async def _backup_create(settings: _Settings, args: argparse.Namespace) -> int:
    passphrase = _backup_passphrase(settings)
    out: Path = args.out
    if args.if_older is not None:
        if args.if_older <= 0:
            raise CliError(EXIT_USAGE, "--if-older must be a positive number of hours")
        try:
            age = time.time() - out.stat().st_mtime
        except FileNotFoundError:
            age = None
        if age is not None and age < args.if_older * 3600:
            record = {"type": "backup", "path": str(out), "skipped": True}
            settings.out.emit(record, f"{out} is recent enough; no new backup")
            return EXIT_OK
    folder = settings.data_dir
    if not (folder / DB_FILE).exists():
        raise CliError(EXIT_USAGE, f"no account in {folder}")
    try:
        client = await Client.open(folder, passphrase, options=_OPTIONS)
    except WrongPassphrase:
        # An account without a passphrase: the passphrase protects the backup only.
        try:
            client = await Client.open(folder, None, options=_OPTIONS)
        except WrongPassphrase:
            raise CliError(EXIT_PASSPHRASE, "the passphrase does not open this account") from None
    try:
        info = await client.recovery.backup(out, passphrase, with_media=args.with_media)
    finally:
        await client.close()
    record = backup_record(info)
    media = f", {info.media_files} files" if args.with_media else ""
    settings.out.emit(
        record, f"backup of {info.username} written to {info.path} ({info.size} bytes{media})"
    )
    return EXIT_OK


async def _backup_restore(settings: _Settings, args: argparse.Namespace) -> int:
    passphrase = _backup_passphrase(settings)
    folder = settings.data_dir
    client = await Client.restore(args.file, folder, passphrase, options=_OPTIONS)
    finished = True
    try:
        try:
            await asyncio.wait_for(client.register(), settings.network_timeout)
        except (TimeoutError, TransportError):
            finished = False
        seq = await asyncio.to_thread(client.history.max_seq, "messages")
        await asyncio.to_thread(_write_cursor, folder, seq)
    finally:
        await client.close()
    record = {
        "type": "restored",
        "username": client.username,
        "device": client.device_id,
        "relay": client.relay_url,
        "data": str(folder),
        "registered": finished,
    }
    text = f"restored {client.username} (device {client.device_id}) into {folder}"
    if not finished:
        raise CliError(
            EXIT_UNREACHABLE,
            f"{text}, but the relay at {client.relay_url} could not be told; run "
            f"'blindpost --data {folder} init {client.username} --relay {client.relay_url}' "
            "to finish",
        )
    settings.out.emit(
        record,
        text + "\nits other devices are logged out; contacts' next messages set up new sessions",
    )
    return EXIT_OK
