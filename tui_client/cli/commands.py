# Invariants:
# * Commands that need nothing from the relay (history, search, contacts, safety-number,
#   group list) never connect; the others connect send-only (no deliveries taken), except
#   `receive` and `daemon`, which receive.
# * stdout carries results only (human text, or one JSON object per line with --json);
#   keys, passphrases and ciphertext are never printed.
# * `receive` saves its cursor after each printed batch of at most CHECKPOINT_EVERY records.
"""One coroutine per ``blindpost`` subcommand, and the table that names them."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, Final

from e2ee.client import (
    DB_FILE,
    Client,
    GroupInfo,
    History,
    StoredMessage,
)
from e2ee.client_errors import (
    IdentityHeld,
    InviteInvalid,
    InviteRequired,
    RegistrationClosed,
    RegistrationRefused,
    RelayRejected,
    UsernameTaken,
)
from e2ee.errors import TransportError, UsageError
from e2ee.events import (
    BacklogDrained,
)
from tui_client.cli.account_cmds import (
    _first_recovery_key,
    _recovery_key_lines,
    cmd_backup,
    cmd_recover,
    cmd_recovery_key,
    cmd_sealed,
)
from tui_client.cli.checks import (
    _group_id,
    _message_id,
    _relay_urls,
    _split_words,
    _Target,
    _target,
    _username,
)
from tui_client.cli.device_cmds import cmd_devices, cmd_link
from tui_client.cli.events import _show_event
from tui_client.cli.exits import (
    ENV_PASSPHRASE,
    EXIT_ERROR,
    EXIT_HELD,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TAKEN,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    CliError,
)
from tui_client.cli.output import (
    AttachmentInfo,
    clean,
    human_message,
    message_record,
)
from tui_client.cli.session import (
    _OPTIONS,
    _account,
    _Activity,
    _messages_after,
    _read_cursor,
    _remove_account_files,
    _Session,
    _Settings,
    _write_cursor,
)

#: `receive` saves its position at least every this many printed messages.
CHECKPOINT_EVERY: Final = 200


def _registration_refused(exc: RegistrationRefused, user: str, relay: str) -> str:
    if isinstance(exc, RegistrationClosed):
        return f"the relay at {relay} does not accept new accounts (registration is closed)"
    if isinstance(exc, InviteRequired):
        return (
            f"the relay at {relay} registers by invitation only: ask its operator for a code,"
            f" then run 'init {user} --relay {relay} --invite CODE'"
        )
    if isinstance(exc, InviteInvalid):
        return (
            f"the relay at {relay} refused the invite code (unknown, already used or expired);"
            " ask its operator for a new one"
        )
    return f"the relay at {relay} refused the registration ({exc}); run the same 'init' again"


async def cmd_init(settings: _Settings, args: argparse.Namespace) -> int:
    user = _username(args.username)
    relays = _relay_urls(args.relay)
    relay = relays[0]
    folder = settings.data_dir
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot create {folder}: {exc.strerror}") from exc
    fresh = not (folder / DB_FILE).exists()
    if fresh:
        client = await Client.create(
            folder,
            user,
            relays,
            passphrase=settings.passphrase,
            strict_trust=args.strict_trust,
            options=_OPTIONS,
        )
    else:
        client = await Client.open(folder, settings.passphrase, options=_OPTIONS)
        # The same account may be given its relay's nodes anew (one added or removed): at
        # least one URL in common says it is the same relay.
        if client.username != user or not set(client.relay_urls) & set(relays):
            await client.close()
            raise CliError(
                EXIT_USAGE,
                f"{folder} already holds the account {client.username!r} at "
                + ", ".join(client.relay_urls),
            )
        if client.relay_urls != relays:
            await client.set_relay_urls(relays)
    taken = False
    try:
        if not client.is_registered:
            try:
                # The timeout also covers the proof of work the SDK solves in pow mode
                # (about a second at the relay's default difficulty).
                await asyncio.wait_for(
                    client.register(invite=args.invite), settings.network_timeout
                )
            except RegistrationRefused as exc:
                raise CliError(EXIT_REFUSED, _registration_refused(exc, user, relay)) from None
            except UsernameTaken:
                taken = fresh
                raise CliError(
                    EXIT_TAKEN,
                    f"the username {user!r} is already registered at {relay}; "
                    "choose another (names are never reused)",
                ) from None
            except (TimeoutError, TransportError) as exc:
                reason = "no answer" if isinstance(exc, TimeoutError) else str(exc)
                code = EXIT_REFUSED if isinstance(exc, RelayRejected) else EXIT_UNREACHABLE
                raise CliError(
                    code,
                    f"cannot register at {relay} ({reason}); the keys are kept: run the "
                    "same 'init' again to finish",
                ) from None
        recovery_key = await _first_recovery_key(client, settings, relay)
        seq = await asyncio.to_thread(client.history.max_seq, "messages")
        await asyncio.to_thread(_write_cursor, folder, seq)
    finally:
        await client.close()
        if taken:
            _remove_account_files(folder)
    fingerprint = client.fingerprint
    record = {
        "type": "account",
        "username": user,
        "device": client.device_id,
        "relay": relay,
        "relays": list(relays),
        "data": str(folder),
        "fingerprint": fingerprint,
        "passphrase": settings.passphrase is not None,
        "recovery_key": recovery_key,
    }
    groups = [fingerprint[i : i + 5] for i in range(0, len(fingerprint), 5)]
    lines = [
        f"registered {user} (device {client.device_id}) at {relay}"
        + (f" (and {', '.join(relays[1:])})" if len(relays) > 1 else ""),
        f"data: {folder}",
        "your safety-number card (your half of every safety number with you):",
        "    " + " ".join(groups[:3]),
        "    " + " ".join(groups[3:]),
        f"contacts compare the full number with 'blindpost safety-number {user}'",
    ]
    if recovery_key is not None:
        lines += _recovery_key_lines(recovery_key, user)
    if settings.passphrase is None:
        lines.append(
            "note: no passphrase; the keys are protected by file permissions only "
            f"(set {ENV_PASSPHRASE} or --passphrase-file at init to seal them)"
        )
    settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


def _sent_record(mid: str, target: _Target) -> dict[str, Any]:
    return {
        "type": "sent",
        "id": mid,
        "message_ids": [mid],
        "chat": target.chat_id,
        "to": target.user,
        "group": target.group,
    }


async def cmd_send(settings: _Settings, args: argparse.Namespace) -> int:
    target, text = _split_words(args, "TEXT")
    if text == "-":
        text = sys.stdin.read().removesuffix("\n")
    if not text:
        raise CliError(EXIT_USAGE, "the message text is empty")
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        await session.start()
        try:
            mid = await session.bounded(
                session.client.send_text(target.to, text),
                "the relay to accept the message",
            )
        except IdentityHeld as exc:
            raise await session.held_error(target.chat_id, exc) from None
    settings.out.emit(_sent_record(mid, target), f"sent to {target.label}: {mid}")
    return EXIT_OK


async def cmd_send_file(settings: _Settings, args: argparse.Namespace) -> int:
    target, name = _split_words(args, "PATH")
    path = Path(name)
    if not path.is_file():
        raise CliError(EXIT_NOT_FOUND, f"no such file: {path}")
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        await session.start()
        activity = _Activity()
        try:
            mid = await session.bounded(
                session.client.send_file(
                    target.to, path, mime_type=args.mime, caption=args.caption, progress=activity
                ),
                "the relay to accept the file",
                activity=activity,
            )
        except IdentityHeld as exc:
            raise await session.held_error(target.chat_id, exc) from None
    record = _sent_record(mid, target) | {"file": path.name, "size": path.stat().st_size}
    settings.out.emit(record, f"sent {path.name} to {target.label}: {mid}")
    return EXIT_OK


async def cmd_receive(settings: _Settings, args: argparse.Namespace) -> int:
    timeout: float | None = args.timeout
    if timeout is not None and timeout < 0:
        raise CliError(EXIT_USAGE, "--timeout must not be negative")
    folder = settings.data_dir
    async with _account(settings, connect=False) as session:
        cursor = _read_cursor(folder)
        if cursor is None:
            cursor = await asyncio.to_thread(session.history.max_seq, "messages")
        session.printed_seq = cursor
        checkpoint = _Checkpoint(folder, cursor)
        try:
            # Incoming messages stored by another program (the TUI) since the last
            # `receive` come first; one-shot commands take no deliveries.
            for message in await asyncio.to_thread(_messages_after, session.history, cursor):
                await session.show_message(message)
            await checkpoint.save(session.printed_seq)
            await session.connect(receive=True)
            await _receive_loop(session, timeout, checkpoint)
            await session.flush_outbox()  # delivered receipts for what we just printed
            # Closing finishes a batch in progress; its events are queued before the
            # "closed" state, so everything stored is printed here.
            await session.close()
            while (event := session.take_ready()) is not None:
                await _show_event(session, event)
        finally:
            await asyncio.to_thread(_write_cursor, folder, session.printed_seq)
    return EXIT_OK


class _Checkpoint:
    """Saves ``receive``'s position after each printed batch, not only at exit.

    A ``receive`` killed mid-way (SIGKILL) then prints again at most what it
    printed since the last save: one batch (``CHECKPOINT_EVERY`` messages, or
    what arrived together). Output is flushed per record before a save.
    """

    def __init__(self, folder: Path, saved: int) -> None:
        self._folder = folder
        self._saved = saved
        self._printed = 0

    async def save(self, seq: int) -> None:
        if seq != self._saved:
            await asyncio.to_thread(_write_cursor, self._folder, seq)
            self._saved = seq
        self._printed = 0

    async def printed(self, seq: int) -> None:
        self._printed += 1
        if self._printed >= CHECKPOINT_EVERY:
            await self.save(seq)


async def _receive_loop(session: _Session, timeout: float | None, checkpoint: _Checkpoint) -> None:
    """Print events until the backlog is drained and then ``timeout`` passed.

    The backlog ends with :class:`BacklogDrained`. Should it never come (the
    connection keeps dropping), the network timeout without any event ends it.
    The position is saved whenever nothing more is waiting to be printed.
    """
    loop = asyncio.get_running_loop()
    idle = session.settings.network_timeout
    drained = False
    deadline = loop.time() + idle  # before draining: inactivity; after: the end
    while True:
        now = loop.time()
        if now >= deadline:
            if drained:
                return
            drained, deadline = True, now + (timeout or 0.0)
            continue
        event = session.take_ready()
        if event is None:
            await checkpoint.save(session.printed_seq)  # caught up with what arrived
            event = await session.next_event(deadline - now)
        if event is None:
            continue
        if isinstance(event, BacklogDrained):
            if not drained:
                drained, deadline = True, loop.time() + (timeout or 0.0)
            continue
        if not drained:
            deadline = loop.time() + idle
        await _show_event(session, event)
        await checkpoint.printed(session.printed_seq)


async def cmd_download(settings: _Settings, args: argparse.Namespace) -> int:
    mid = _message_id(args.message_id)
    async with _account(settings, connect=False) as session:
        message = await asyncio.to_thread(session.history.message, mid)
        if message is None:
            raise CliError(EXIT_NOT_FOUND, f"no message {mid} in this account's history")
        record = await _download(session, mid, args.out, args.force, "--force")
    settings.out.emit(record, f"saved {record['path']}")
    return EXIT_OK


async def _download(
    session: _Session, mid: str, out: Path, force: bool, force_name: str, unknown: str = ""
) -> dict[str, Any]:
    """Save message ``mid``'s file to ``out`` (a file, or a folder to put it in); the record
    ``download`` prints (the daemon's answer too).

    Raises:
        CliError: no file (EXIT_NOT_FOUND), or ``out`` exists without ``force`` (EXIT_ERROR).
    """
    found = await asyncio.to_thread(session.history.attachment_info, mid)
    if found is None or not found.available:
        what = "has no file" if found is None else "no longer has its file (deleted)"
        raise CliError(EXIT_NOT_FOUND, f"message {mid} {what}{unknown}")
    info = AttachmentInfo(mid, found.file_name, found.size, found.mime_type)
    if out.is_dir():
        out = out / _safe_file_name(info.name, mid)
    if out.exists() and not force:
        raise CliError(EXIT_ERROR, f"{out} exists (use {force_name} to replace it)")
    activity = _Activity()
    try:
        await session.bounded(
            session.client.download_attachment(mid, out, progress=activity),
            "the file download",
            activity=activity,
        )
    except UsageError as exc:
        # Deleted or expired messages keep their row but lose the file key.
        raise CliError(EXIT_NOT_FOUND, f"message {mid}: {exc}") from None
    return {
        "type": "download",
        "id": mid,
        "path": str(out),
        "size": out.stat().st_size,
        "name": info.name,
        "mime": info.mime,
    }


def _safe_file_name(name: str, fallback: str) -> str:
    """The sender's file name, without directories or control characters."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if base in ("", ".", ".."):
        return fallback
    return base[:200]


async def cmd_read(settings: _Settings, args: argparse.Namespace) -> int:
    target = _target(args.group, args.user)
    async with _account(settings, connect=False) as session:
        if target.group:
            await _find_group(session, target.group)
        count = await session.client.mark_read(target.chat_id)
        queued = 0
        if count:
            try:
                await session.start()
            except CliError as exc:
                raise CliError(
                    exc.code,
                    f"marked {count} message(s) read; the read receipts stay queued "
                    f"(they go out with the next command that connects): {exc}",
                ) from None
            queued = await session.flush_outbox()
    record = {"type": "read", "chat": target.chat_id, "marked": count, "queued": queued}
    human = f"marked {count} message(s) read in {target.chat_id}"
    if queued:
        human += f"; {queued} receipt(s) or message(s) still queued"
    settings.out.emit(record, human)
    return EXIT_OK


def _limit(value: int) -> int:
    if not 1 <= value <= 1000:
        raise CliError(EXIT_USAGE, "--limit must be between 1 and 1000")
    return value


def _with_receipts(
    history: History, messages: Sequence[StoredMessage]
) -> list[tuple[StoredMessage, dict[str, str]]]:
    """Each message with its best status per recipient (outgoing ones; blocking)."""
    rows = []
    for message in messages:
        best: dict[str, str] = {}
        if message.outgoing:
            for (user, _device), status in history.receipts(message.id).items():
                best[user] = History.status_at_least(best.get(user), status)
        rows.append((message, best))
    return rows


async def history_page(
    session: _Session,
    target: _Target,
    *,
    limit: int,
    before: str | None = None,
    after: str | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """One page of a chat, oldest first, as (JSON record, human line) pairs.

    Raises:
        CliError: bad limit or id (2), unknown group, or an anchor not in the chat (5).
    """
    _limit(limit)
    anchor_before = None if before is None else _message_id(before)
    anchor_after = None if after is None else _message_id(after)
    if target.group:
        await _find_group(session, target.group)
    history = session.history

    def load() -> list[tuple[StoredMessage, dict[str, str]]]:
        page = history.messages(
            target.chat_id, before=anchor_before, after=anchor_after, limit=limit
        )
        return _with_receipts(history, page)

    try:
        rows = await asyncio.to_thread(load)
    except UsageError:
        anchor = anchor_before or anchor_after
        raise CliError(
            EXIT_NOT_FOUND, f"message {anchor} is not in the chat with {target.label}"
        ) from None
    name = await session.group_name(target.group)
    out = []
    for message, receipts in rows:
        attachment = await session.attachment(message)
        out.append(
            (
                message_record(message, attachment, receipts=receipts),
                human_message(message, attachment, name, with_status=True),
            )
        )
    return out


async def search_page(
    session: _Session,
    text: str,
    *,
    target: _Target | None = None,
    limit: int = 50,
    before: str | None = None,
) -> list[tuple[dict[str, Any], str]]:
    """Messages whose words start with ``text``'s words, newest first, as output pairs.

    Raises:
        CliError: bad limit or id (2), unknown group, or ``before`` unknown (5).
    """
    _limit(limit)
    if not text.strip():
        raise CliError(EXIT_USAGE, "the search text is empty")
    anchor = None if before is None else _message_id(before)
    if target is not None and target.group:
        await _find_group(session, target.group)
    history = session.history
    chat = None if target is None else target.chat_id

    def load() -> list[tuple[StoredMessage, dict[str, str]]]:
        found = history.search_newest(text, chat_id=chat, before=anchor, limit=limit)
        return _with_receipts(history, found)

    try:
        rows = await asyncio.to_thread(load)
    except UsageError:
        raise CliError(EXIT_NOT_FOUND, f"no message {anchor} in this account's history") from None
    out = []
    for message, receipts in rows:
        attachment = await session.attachment(message)
        name = await session.group_name(message.group_id)
        out.append(
            (
                message_record(message, attachment, receipts=receipts),
                human_message(message, attachment, name, with_status=True),
            )
        )
    return out


async def cmd_history(settings: _Settings, args: argparse.Namespace) -> int:
    target = _target(args.group, args.user)
    _limit(args.limit)
    async with _account(settings, connect=False) as session:
        rows = await history_page(
            session, target, limit=args.limit, before=args.before, after=args.after
        )
        for record, human in rows:
            settings.out.emit(record, human)
        if not rows and not settings.out.as_json:
            settings.out.emit({}, f"no messages with {target.label}")
    return EXIT_OK


async def cmd_search(settings: _Settings, args: argparse.Namespace) -> int:
    target = None
    if args.user is not None or args.group is not None:
        target = _target(args.group, args.user)
    _limit(args.limit)
    async with _account(settings, connect=False) as session:
        rows = await search_page(
            session, args.text, target=target, limit=args.limit, before=args.before
        )
        for record, human in rows:
            settings.out.emit(record, human)
        if not rows and not settings.out.as_json:
            settings.out.emit({}, f"no messages match {clean(args.text, newlines=False)!r}")
    return EXIT_OK


def _group_record(group: GroupInfo) -> dict[str, Any]:
    return {
        "type": "group_info",
        "group": group.id,
        "name": group.name,
        "members": list(group.members),
        "admins": list(group.admins),
        "member": group.member,
    }


async def _find_group(session: _Session, gid: str) -> GroupInfo:
    for group in await session.client.groups():
        if group.id == gid:
            return group
    raise CliError(EXIT_NOT_FOUND, f"unknown group {gid}")


def _human_group(record: Mapping[str, Any]) -> str:
    state = "" if record["member"] else " (you are not a member)"
    return (
        f'{record["group"]} "{clean(record["name"], newlines=False)}"{state}: '
        f"members {', '.join(record['members'])}; admins {', '.join(record['admins']) or '-'}"
    )


async def cmd_group(settings: _Settings, args: argparse.Namespace) -> int:
    action: str = args.group_command
    out = settings.out
    if action == "list":
        async with _account(settings, connect=False) as session:
            groups = await session.client.groups()
            for group in groups:
                record = _group_record(group)
                out.emit(record, _human_group(record))
            if not groups and not out.as_json:
                out.emit({}, "no groups")
        return EXIT_OK
    if action == "create":
        members = [_username(m) for m in args.members]
        name: str = args.name
        if not name.strip():
            raise CliError(EXIT_USAGE, "the group name is empty")
        async with _account(settings, connect=True) as session:
            try:
                gid = await session.bounded(
                    session.client.create_group(name, members),
                    "the relay to accept the group",
                )
            except IdentityHeld as exc:
                raise CliError(
                    EXIT_HELD,
                    f"the identity key of {exc.user} changed: the group is created but "
                    f"{exc.user} is told only after 'blindpost trust {exc.user}'",
                ) from None
            record = _group_record(await _find_group(session, gid))
        out.emit(
            record | {"type": "group", "action": "create", "by": session.client.username},
            f'created group "{clean(name, newlines=False)}" with {", ".join(record["members"])}: '
            f"{gid}",
        )
        return EXIT_OK
    gid = _group_id(args.group_id)
    async with _account(settings, connect=False) as session:
        await _find_group(session, gid)
        await session.start()
        client = session.client
        if action == "add":
            user = _username(args.username)
            work: Awaitable[None] = client.add_member(gid, user)
            human = f"added {user} to group {gid}"
        elif action == "remove":
            user = _username(args.username)
            work = client.remove_member(gid, user)
            human = f"removed {user} from group {gid}"
        else:
            work = client.leave_group(gid)
            human = f"left group {gid}"
        try:
            await session.bounded(work, "the relay to accept the group change")
        except IdentityHeld as exc:
            raise CliError(
                EXIT_HELD,
                f"the identity key of {exc.user} changed: the change is queued until "
                f"'blindpost trust {exc.user}'",
            ) from None
        record = _group_record(await _find_group(session, gid))
    out.emit(record | {"type": "group", "action": action, "by": client.username}, human)
    return EXIT_OK


def _overall_trust(levels: Mapping[int, str]) -> str:
    if not levels:
        return "none"
    values = set(levels.values())
    if "untrusted" in values:
        return "untrusted"
    if values == {"verified"}:
        return "verified"
    return "tofu"


async def _known_levels(session: _Session, user: str) -> dict[int, str]:
    levels = await session.client.trust_level(user)
    if not levels:
        raise CliError(
            EXIT_NOT_FOUND,
            f"no identity key known for {user} yet: exchange a message with {user} first",
        )
    return levels


async def cmd_safety_number(settings: _Settings, args: argparse.Namespace) -> int:
    user = _username(args.username)
    async with _account(settings, connect=False) as session:
        levels = await _known_levels(session, user)
        numbers = await session.client.safety_number(user)
    for device, number in numbers:
        trust = levels.get(device, "none")
        record = {
            "type": "safety_number",
            "user": user,
            "device": device,
            "digits": number.digits,
            "trust": trust,
            "scannable": base64.b64encode(number.scannable).decode("ascii"),
        }
        lines = [f"safety number with {user} (device {device}, trust: {trust}):"]
        lines += ["    " + line for line in number.display().splitlines()]
        if args.qr:
            from e2ee.qr import qr_terminal

            lines.append(qr_terminal(number.scannable))
        lines.append(f"compare it with {user}'s screen, then run: blindpost verify {user}")
        settings.out.emit(record, "\n".join(lines))
    return EXIT_OK


async def _accept(settings: _Settings, user: str, *, verified: bool) -> int:
    async with _account(settings, connect=False) as session:
        levels = await _known_levels(session, user)
        before = _overall_trust(levels)
        if not verified and before != "untrusted":
            settings.out.emit(
                {"type": "trust", "user": user, "trust": before, "changed": False, "sent": 0},
                f"nothing to accept: the identity key of {user} did not change (trust: {before})",
            )
            return EXIT_OK
        await session.client.accept_identity(user, verified=verified)
        after = _overall_trust(await session.client.trust_level(user))
        queued = len(await asyncio.to_thread(session.history.pending_outbox))
        still = 0
        if queued:
            try:
                await session.start()
            except CliError as exc:
                raise CliError(
                    exc.code,
                    f"{user} is now {after}; {queued} queued message(s) go out with the next "
                    f"command that connects: {exc}",
                ) from None
            still = await session.flush_outbox()
    record = {"type": "trust", "user": user, "trust": after, "changed": True}
    record |= {"sent": queued - still, "queued": still}
    human = f"{user} is now {after}"
    if queued:
        human += f"; sent {queued - still} queued message(s)"
        if still:
            human += f", {still} still queued"
    settings.out.emit(record, human)
    return EXIT_OK


async def cmd_trust(settings: _Settings, args: argparse.Namespace) -> int:
    return await _accept(settings, _username(args.username), verified=False)


async def cmd_verify(settings: _Settings, args: argparse.Namespace) -> int:
    return await _accept(settings, _username(args.username), verified=True)


async def cmd_contacts(settings: _Settings, args: argparse.Namespace) -> int:
    async with _account(settings, connect=False) as session:
        contacts = await session.client.contacts()
    for user, levels in sorted(contacts.items()):
        trust = _overall_trust(levels)
        devices = ", ".join(f"device {d}: {t}" for d, t in sorted(levels.items()))
        note = " (key changed: sending held until 'trust')" if trust == "untrusted" else ""
        settings.out.emit(
            {
                "type": "contact",
                "user": user,
                "trust": trust,
                "devices": {str(d): t for d, t in sorted(levels.items())},
            },
            f"{user:<32} {trust}{note}" + (f"  [{devices}]" if devices else ""),
        )
    return EXIT_OK


async def cmd_daemon(settings: _Settings, args: argparse.Namespace) -> int:
    from tui_client.daemon import cmd_daemon as serve

    return await serve(settings, args)


_COMMANDS: Final[dict[str, Callable[[_Settings, argparse.Namespace], Coroutine[Any, Any, int]]]] = {
    "init": cmd_init,
    "send": cmd_send,
    "send-file": cmd_send_file,
    "receive": cmd_receive,
    "download": cmd_download,
    "read": cmd_read,
    "history": cmd_history,
    "search": cmd_search,
    "group": cmd_group,
    "safety-number": cmd_safety_number,
    "trust": cmd_trust,
    "verify": cmd_verify,
    "contacts": cmd_contacts,
    "daemon": cmd_daemon,
    "recover": cmd_recover,
    "recovery-key": cmd_recovery_key,
    "sealed": cmd_sealed,
    "backup": cmd_backup,
    "link": cmd_link,
    "devices": cmd_devices,
}
