"""QR codes for safety numbers: a terminal rendering and an SVG document.

Invariants:

* The symbol encodes the payload bytes exactly: byte mode, no text encoding,
  no ECI header, so a scanner hands back the same bytes to
  :meth:`e2ee.core.fingerprint.SafetyNumber.matches_scanned`.
* The same payload always gives the same symbol (segno picks the version and
  mask deterministically), so renderings can be snapshot-tested.
* A safety-number payload (74 bytes, QR version 5 at level M) rendered by
  :func:`qr_terminal` with the default border is 41 columns by 21 lines, well
  inside an 80x24 terminal.  Payloads up to 106 bytes (version 6) still fit.

Only this module imports segno; :mod:`e2ee.core` stays free of it.
"""

from __future__ import annotations

import io
from typing import Final

import segno

from e2ee.errors import UsageError

__all__ = [
    "DEFAULT_TERMINAL_BORDER",
    "ERROR_CORRECTION",
    "qr_svg",
    "qr_terminal",
]

#: Error-correction level: M restores about 15% of the symbol, enough for a photo
#: of a screen, while keeping a safety-number payload at version 5.
ERROR_CORRECTION: Final = "m"
#: Quiet zone in modules for the terminal.  The standard asks for 4; 2 keeps the
#: code small on an 80x24 screen and is read fine by phone scanners, and the
#: terminal's own background usually widens it anyway.
DEFAULT_TERMINAL_BORDER: Final = 2
_MAX_BORDER: Final = 16

# Half-block characters, indexed by (top has ink, bottom has ink).
_HALF_BLOCKS: Final = {
    (False, False): " ",
    (True, False): "\u2580",  # upper half block
    (False, True): "\u2584",  # lower half block
    (True, True): "\u2588",  # full block
}


def _make(payload: bytes) -> segno.QRCode:
    if not isinstance(payload, bytes):
        raise UsageError(f"payload: expected bytes, got {type(payload).__name__}")
    if not payload:
        raise UsageError("payload: must not be empty")
    try:
        return segno.make_qr(payload, error=ERROR_CORRECTION, mode="byte")
    except ValueError as exc:  # segno.DataOverflowError is a ValueError
        raise UsageError(f"payload: {len(payload)} bytes do not fit in a QR code") from exc


def _check_border(border: int) -> int:
    if isinstance(border, bool) or not isinstance(border, int) or not 0 <= border <= _MAX_BORDER:
        raise UsageError(f"border: expected an int from 0 to {_MAX_BORDER}")
    return border


def qr_terminal(
    payload: bytes,
    *,
    border: int = DEFAULT_TERMINAL_BORDER,
    dark_terminal: bool = True,
) -> str:
    """Render a QR code as text, two modules per character cell.

    Each character stands for one column of two stacked modules, drawn with
    the half-block characters, so modules come out roughly square in a
    terminal's tall character cells.

    Args:
        payload: the bytes to encode (e.g. ``SafetyNumber.scannable``).
        border: quiet zone in modules around the symbol.
        dark_terminal: True (the default) for light text on a dark
            background: the light modules and the quiet zone are drawn in
            block characters, so the code reads dark-on-light as scanners
            expect.  False for dark text on a light background.

    Returns:
        Lines joined by ``"\\n"`` (no trailing newline), every line the same
        width: ``size + 2 * border`` columns and half as many lines, rounded up.

    Raises:
        UsageError: ``payload`` is not non-empty ``bytes`` or too large for a
            QR code, or ``border`` is out of range.
    """
    qr = _make(payload)
    border = _check_border(border)
    ink_is_dark = not dark_terminal
    rows = [
        [bool(module) == ink_is_dark for module in row]
        for row in qr.matrix_iter(scale=1, border=border)
    ]
    if len(rows) % 2:
        # The extra half row is quiet zone: light, like the border.
        rows.append([not ink_is_dark] * len(rows[0]))
    return "\n".join(
        "".join(_HALF_BLOCKS[top, bottom] for top, bottom in zip(upper, lower, strict=True))
        for upper, lower in zip(rows[::2], rows[1::2], strict=True)
    )


def qr_svg(payload: bytes, *, scale: int = 8, border: int = 4) -> str:
    """Render a QR code as a standalone SVG document.

    Black modules on an opaque white background (a transparent one would
    vanish in a dark-themed viewer), without an XML declaration so the result
    can also be inlined in HTML.

    Args:
        payload: the bytes to encode (e.g. ``SafetyNumber.scannable``).
        scale: size of one module in SVG user units (pixels by default).
        border: quiet zone in modules; the standard's 4 by default.

    Returns:
        The SVG document as text.

    Raises:
        UsageError: ``payload`` is not non-empty ``bytes`` or too large for a
            QR code, or ``scale`` or ``border`` is out of range.
    """
    qr = _make(payload)
    border = _check_border(border)
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 100:
        raise UsageError("scale: expected an int from 1 to 100")
    out = io.BytesIO()
    qr.save(
        out,
        kind="svg",
        scale=scale,
        border=border,
        dark="#000",
        light="#fff",
        xmldecl=False,
        svgclass=None,
        lineclass=None,
    )
    return out.getvalue().decode("utf-8")
