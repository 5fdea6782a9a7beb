"""Inline image previews: the real app against a real relay, and the renderer's limits."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.text import Text
from textual.widgets import Input
from tui_harness import until

from e2ee.client import Client
from e2ee.history import direct_chat_id
from tui_client.adapter import Opener
from tui_client.app import BlindpostApp
from tui_client.screens.dialogs import AttachScreen
from tui_client.screens.main import MainScreen
from tui_client.widgets.conversation import MessageList
from tui_client.widgets.image_preview import MAX_PIXELS, PreviewError, render_preview

MakeClient = Callable[..., Awaitable[Client]]
MakeOpener = Callable[..., Opener]
SIZE = (100, 34)
RED, BLUE = (200, 0, 0), (0, 0, 200)


def _two_band_png(width: int = 64, height: int = 32) -> bytes:
    """Red top half, blue bottom half."""
    im = Image.new("RGB", (width, height), RED)
    im.paste(BLUE, (0, height // 2, width, height))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    png = _two_band_png(2, 2)
    # IHDR is the first chunk: 8-byte signature, length, "IHDR", 13 bytes of data, CRC.
    data = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + data
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def _colours(preview: Text) -> set[str]:
    found: set[str] = set()
    for span in preview.spans:
        style = span.style
        if not isinstance(style, str):
            for colour in (style.color, style.bgcolor):
                if colour is not None and colour.triplet is not None:
                    found.add(colour.triplet.hex)
    return found


def test_render_draws_half_blocks_within_the_cell_bounds() -> None:
    preview = render_preview(_two_band_png(), 32, 8)
    lines = preview.plain.split("\n")
    assert 0 < len(lines) <= 8 and all(0 < len(line) <= 32 for line in lines)
    assert set(preview.plain) <= {"▀", "\n"}
    assert {"#c80000", "#0000c8"} <= _colours(preview)


def test_render_refuses_a_decompression_bomb_from_its_header() -> None:
    side = int(MAX_PIXELS**0.5) + 100
    with pytest.raises(PreviewError, match="too large"):
        render_preview(_bomb_png(side, side), 32, 8)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x89PNG fake image bytes" * 100, _two_band_png()[: len(_two_band_png()) // 2]],
    ids=["empty", "not-an-image", "truncated"],
)
def test_render_reports_corrupt_images(data: bytes) -> None:
    with pytest.raises(PreviewError):
        render_preview(data, 32, 8)


async def test_received_and_sent_images_show_a_preview_and_corrupt_ones_a_placeholder(
    tui_opener: MakeOpener, sdk_client: MakeClient, tui_relay: Any, tmp_path: Path
) -> None:
    bob = await sdk_client("bob")
    backend = await tui_opener("alice").create("alice", tui_relay.url, None)
    app = BlindpostApp(backend=backend)
    picture, broken = tmp_path / "bands.png", tmp_path / "broken.png"
    picture.write_bytes(_two_band_png())
    broken.write_bytes(picture.read_bytes()[:100])  # cut off in the middle of the pixels
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, MainScreen))
        screen = app.screen
        assert isinstance(screen, MainScreen)
        listed = screen.query_one(MessageList)
        screen.open_chat(direct_chat_id("bob"))
        received = await bob.send_file("alice", picture)
        corrupt = await bob.send_file("alice", broken)

        await until(pilot, lambda: isinstance(listed.preview(received), Text))
        preview = listed.preview(received)
        assert isinstance(preview, Text)
        assert {"#c80000", "#0000c8"} <= _colours(preview)
        shown = listed.get_option(received).prompt
        assert isinstance(shown, Text)
        assert "📎 bands.png" in shown.plain and "▀▀▀▀" in shown.plain

        await until(pilot, lambda: isinstance(listed.preview(corrupt), str))
        shown = listed.get_option(corrupt).prompt
        assert isinstance(shown, Text)
        assert "no preview: corrupt image" in shown.plain

        # Alice's own image gets a preview too (fetched back from the relay).
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, AttachScreen))
        path_input = app.screen.query_one("#attach-path", Input)
        path_input.value = str(picture)
        path_input.focus()
        await pilot.press("enter")
        own = await until(
            pilot, lambda: [m for m in listed.messages() if m.outgoing and m.attachment]
        )
        await until(pilot, lambda: isinstance(listed.preview(own[0].id), Text))
        # The preview files were temporary: nothing decrypted is left behind.
        assert not list(tmp_path.glob("**/blindpost-preview-*"))
