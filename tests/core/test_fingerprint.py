"""Safety numbers (e2ee.core.fingerprint) and their QR renderings (e2ee.qr).

The known-answer vectors are libsignal's (rust/protocol/src/fingerprint.rs,
tests ``fingerprint_test_v1``, ``fingerprint_test_v2`` and
``fingerprint_encodings``): matching them is what makes our number comparable
with any client that follows the same scheme.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import xml.etree.ElementTree as ET

import pytest
import segno
from hypothesis import given, settings
from hypothesis import strategies as st

from e2ee.core.fingerprint import (
    DEFAULT_ITERATIONS,
    FINGERPRINT_LENGTH,
    MAX_SCANNED_BYTES,
    SCANNABLE_VERSION,
    SafetyNumber,
    compute_safety_number,
)
from e2ee.core.keys import generate_identity
from e2ee.errors import (
    E2EEError,
    FingerprintVersionMismatch,
    InvalidMessage,
    PeerError,
    UsageError,
)
from e2ee.qr import DEFAULT_TERMINAL_BORDER, qr_svg, qr_terminal

# -- libsignal's vectors -------------------------------------------------------------

ALICE_KEY = bytes.fromhex("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868")
BOB_KEY = bytes.fromhex("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b")
ALICE_ID = "+14152222222"
BOB_ID = "+14153333333"

DISPLAYABLE = "300354477692869396892869876765458257569162576843440918079131"
ALICE_FP = "1e301a0353dce3dbe7684cb8336e85136cdc0ee96219494ada305d62a7bd61df"
BOB_FP = "d62cbf73a11592015b6b9f1682ac306fea3aaf3885b84d12bca631e9d4fb3a4d"
ALICE_SCANNABLE_V1 = "080112220a20" + ALICE_FP + "1a220a20" + BOB_FP
BOB_SCANNABLE_V1 = "080112220a20" + BOB_FP + "1a220a20" + ALICE_FP
ALICE_SCANNABLE_V2 = "080212220a20" + ALICE_FP + "1a220a20" + BOB_FP
BOB_SCANNABLE_V2 = "080212220a20" + BOB_FP + "1a220a20" + ALICE_FP

#: Enough rounds to exercise the loop, few enough for Hypothesis to run fast.
FAST = 16


@pytest.fixture(scope="module")
def alice() -> SafetyNumber:
    return compute_safety_number(ALICE_KEY, ALICE_ID, BOB_KEY, BOB_ID)


@pytest.fixture(scope="module")
def bob() -> SafetyNumber:
    return compute_safety_number(BOB_KEY, BOB_ID, ALICE_KEY, ALICE_ID)


def test_libsignal_displayable_vector(alice: SafetyNumber, bob: SafetyNumber) -> None:
    assert alice.digits == DISPLAYABLE
    assert bob.digits == DISPLAYABLE
    assert DEFAULT_ITERATIONS == 5200


def test_libsignal_scannable_vector_v1(alice: SafetyNumber, bob: SafetyNumber) -> None:
    assert SCANNABLE_VERSION == 1
    assert alice.scannable.hex() == ALICE_SCANNABLE_V1
    assert bob.scannable.hex() == BOB_SCANNABLE_V1
    assert alice.matches_scanned(bytes.fromhex(BOB_SCANNABLE_V1))
    assert bob.matches_scanned(bytes.fromhex(ALICE_SCANNABLE_V1))


def test_libsignal_scannable_vector_v2_same_digits(alice: SafetyNumber) -> None:
    alice_v2 = dataclasses.replace(alice, scannable_version=2)
    assert alice_v2.scannable.hex() == ALICE_SCANNABLE_V2
    assert alice_v2.digits == DISPLAYABLE
    assert alice_v2.matches_scanned(bytes.fromhex(BOB_SCANNABLE_V2))


def test_libsignal_encoding_vector() -> None:
    number = SafetyNumber(b"\x12" * 32, b"\xba" * 32, scannable_version=2)
    assert number.scannable.hex() == "080212220a20" + "12" * 32 + "1a220a20" + "ba" * 32


def test_other_version_is_a_typed_error(alice: SafetyNumber) -> None:
    with pytest.raises(FingerprintVersionMismatch) as info:
        alice.matches_scanned(bytes.fromhex(BOB_SCANNABLE_V2))
    assert (info.value.ours, info.value.theirs) == (1, 2)
    assert isinstance(info.value, PeerError)


# -- display -------------------------------------------------------------------------


def test_display_is_three_lines_of_four_groups(alice: SafetyNumber) -> None:
    text = alice.display()
    lines = text.split("\n")
    assert len(lines) == 3
    assert all(re.fullmatch(r"\d{5}( \d{5}){3}", line) for line in lines)
    assert text.replace(" ", "").replace("\n", "") == DISPLAYABLE
    assert lines[0] == "30035 44776 92869 39689"


def test_display_on_one_line(alice: SafetyNumber) -> None:
    text = alice.display(groups_per_line=12)
    assert text == " ".join(DISPLAYABLE[i : i + 5] for i in range(0, 60, 5))


@pytest.mark.parametrize("bad", [0, 13, -1, True, 4.0, "4"])
def test_display_rejects_bad_grouping(alice: SafetyNumber, bad: object) -> None:
    with pytest.raises(UsageError):
        alice.display(groups_per_line=bad)  # type: ignore[arg-type]


def test_repr_shows_the_number_only(alice: SafetyNumber) -> None:
    assert repr(alice) == f"SafetyNumber(digits={DISPLAYABLE!r}, scannable_version=1)"


# -- symmetry and sensitivity --------------------------------------------------------


def _public_key(seed: bytes) -> bytes:
    # Any canonical encoding is a valid X25519 public key: clear the high bit
    # and stay below 2**255 - 19.
    key = bytearray(seed)
    key[31] &= 0x7F
    if int.from_bytes(key, "little") >= 2**255 - 19:
        key[0] = 0
    return b"\x05" + bytes(key)


keys = st.binary(min_size=32, max_size=32).map(_public_key)
identifiers = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40)


@settings(max_examples=50, deadline=None)
@given(keys, identifiers, keys, identifiers)
def test_both_sides_agree(a_key: bytes, a_id: str, b_key: bytes, b_id: str) -> None:
    a = compute_safety_number(a_key, a_id, b_key, b_id, iterations=FAST)
    b = compute_safety_number(b_key, b_id, a_key, a_id, iterations=FAST)
    assert a.digits == b.digits
    assert len(a.digits) == 60 and a.digits.isdigit()
    assert a.matches_scanned(b.scannable)
    assert b.matches_scanned(a.scannable)
    if (a_key, a_id) != (b_key, b_id):
        # Scanning your own screen must never pass for a match.
        assert not a.matches_scanned(a.scannable)
        assert not b.matches_scanned(b.scannable)


def test_real_identity_keys_from_python_axolotl() -> None:
    a_key = generate_identity()[0].getPublicKey().serialize()
    b_key = generate_identity()[0].getPublicKey().serialize()
    a = compute_safety_number(a_key, "alice", b_key, "bob", iterations=1024)
    b = compute_safety_number(b_key, "bob", a_key, "alice", iterations=1024)
    assert a.digits == b.digits
    assert a.matches_scanned(b.scannable) and b.matches_scanned(a.scannable)


def test_man_in_the_middle_changes_the_number() -> None:
    mallory = _public_key(b"\x42" * 32)
    # Alice was given Mallory's key under Bob's name; Bob has Alice's real key.
    a = compute_safety_number(ALICE_KEY, ALICE_ID, mallory, BOB_ID, iterations=1024)
    b = compute_safety_number(BOB_KEY, BOB_ID, ALICE_KEY, ALICE_ID, iterations=1024)
    assert a.digits != b.digits
    assert not a.matches_scanned(b.scannable)
    assert not b.matches_scanned(a.scannable)


def test_changed_identifier_changes_the_number() -> None:
    a = compute_safety_number(ALICE_KEY, "+141512222222", BOB_KEY, BOB_ID, iterations=1024)
    b = compute_safety_number(BOB_KEY, BOB_ID, ALICE_KEY, ALICE_ID, iterations=1024)
    assert a.digits != b.digits
    assert not a.matches_scanned(b.scannable)
    assert not b.matches_scanned(a.scannable)


@settings(max_examples=30, deadline=None)
@given(keys, keys, st.integers(0, 32), st.integers(0, 7))
def test_any_key_bit_changes_the_number(a_key: bytes, b_key: bytes, index: int, bit: int) -> None:
    flipped = bytearray(b_key)
    flipped[1 + min(index, 31)] ^= 1 << bit
    other = _public_key(bytes(flipped[1:]))
    if other == b_key:  # the canonicalisation undid the flip
        return
    honest = compute_safety_number(a_key, "a", b_key, "b", iterations=FAST)
    forged = compute_safety_number(a_key, "a", other, "b", iterations=FAST)
    assert honest.digits != forged.digits
    assert honest.scannable != forged.scannable


def test_iterations_matter() -> None:
    fast = compute_safety_number(ALICE_KEY, ALICE_ID, BOB_KEY, BOB_ID, iterations=5199)
    assert fast.digits != DISPLAYABLE


# -- scanned payloads ----------------------------------------------------------------


def test_unknown_fields_are_ignored(alice: SafetyNumber) -> None:
    # Like libsignal (and protobuf in general), a newer peer may add fields.
    payload = bytes.fromhex(BOB_SCANNABLE_V1) + bytes.fromhex("2203") + b"new"
    assert alice.matches_scanned(payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"", id="empty"),
        pytest.param(bytes.fromhex("12220a20" + BOB_FP + "1a220a20" + ALICE_FP), id="no-version"),
        pytest.param(bytes.fromhex("080112220a20" + BOB_FP), id="no-remote"),
        pytest.param(bytes.fromhex("08011a220a20" + ALICE_FP), id="no-local"),
        pytest.param(bytes.fromhex("0801120022220a20" + ALICE_FP), id="empty-local"),
        pytest.param(
            bytes.fromhex("080112210a1f" + BOB_FP[:-2] + "1a220a20" + ALICE_FP), id="short-local"
        ),
        pytest.param(bytes.fromhex(BOB_SCANNABLE_V1)[:-1], id="truncated"),
        pytest.param(b"\xff" * 10, id="garbage"),
        pytest.param(b"https://example.org/", id="a-url"),
        pytest.param(bytes.fromhex(BOB_SCANNABLE_V1) * 14, id="too-long"),
    ],
)
def test_malformed_payloads_are_invalid_message(alice: SafetyNumber, payload: bytes) -> None:
    with pytest.raises(InvalidMessage):
        alice.matches_scanned(payload)


def test_size_limit_is_checked_before_parsing(alice: SafetyNumber) -> None:
    padding = b"\x22" + bytes([0x80 | 0x7F, 0x07]) + b"x" * 1023  # one big unknown field
    assert len(bytes.fromhex(BOB_SCANNABLE_V1) + padding) > MAX_SCANNED_BYTES
    with pytest.raises(InvalidMessage, match="too long"):
        alice.matches_scanned(bytes.fromhex(BOB_SCANNABLE_V1) + padding)


@pytest.mark.parametrize("payload", [BOB_SCANNABLE_V1, bytearray(2), None, 7])
def test_payload_must_be_bytes(alice: SafetyNumber, payload: object) -> None:
    with pytest.raises(UsageError):
        alice.matches_scanned(payload)  # type: ignore[arg-type]


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_arbitrary_payloads_raise_only_peer_errors(alice: SafetyNumber, payload: bytes) -> None:
    try:
        result = alice.matches_scanned(payload)
    except PeerError:
        return
    assert result is False or payload.startswith(bytes.fromhex(BOB_SCANNABLE_V1))


@settings(max_examples=500)
@given(st.data())
def test_mutated_payloads_never_match(alice: SafetyNumber, data: st.DataObject) -> None:
    genuine = bytearray(bytes.fromhex(BOB_SCANNABLE_V1))
    index = data.draw(st.integers(0, len(genuine) - 1))
    genuine[index] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(PeerError):
        assert alice.matches_scanned(bytes(genuine)) is False


# -- argument checking ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(ALICE_KEY[1:], id="no-type-byte"),
        pytest.param(b"\x06" + ALICE_KEY[1:], id="wrong-type-byte"),
        pytest.param(ALICE_KEY + b"\x00", id="too-long"),
        pytest.param(b"\x05" + b"\xff" * 32, id="non-canonical"),
        pytest.param(b"\x05" + (2**255 - 19).to_bytes(32, "little"), id="p"),
        pytest.param(bytearray(ALICE_KEY), id="bytearray"),
        pytest.param(ALICE_KEY.hex(), id="hex-str"),
        pytest.param(None, id="none"),
    ],
)
def test_bad_keys_are_usage_errors(key: object) -> None:
    with pytest.raises(UsageError):
        compute_safety_number(key, ALICE_ID, BOB_KEY, BOB_ID, iterations=FAST)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        compute_safety_number(ALICE_KEY, ALICE_ID, key, BOB_ID, iterations=FAST)  # type: ignore[arg-type]


@pytest.mark.parametrize("identifier", ["", "\ud800", b"+14152222222", None])
def test_bad_identifiers_are_usage_errors(identifier: object) -> None:
    with pytest.raises(UsageError):
        compute_safety_number(ALICE_KEY, identifier, BOB_KEY, BOB_ID, iterations=FAST)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        compute_safety_number(ALICE_KEY, ALICE_ID, BOB_KEY, identifier, iterations=FAST)  # type: ignore[arg-type]


@pytest.mark.parametrize("iterations", [-1, 0, 1, 1_000_001, True, 5200.0, "5200"])
def test_bad_iteration_counts_are_usage_errors(iterations: object) -> None:
    with pytest.raises(UsageError):
        compute_safety_number(ALICE_KEY, ALICE_ID, BOB_KEY, BOB_ID, iterations=iterations)  # type: ignore[arg-type]


_ZERO = b"\x00" * 32


@pytest.mark.parametrize(
    ("local", "remote", "version"),
    [
        (b"\x00" * 31, _ZERO, 1),
        (_ZERO, "0" * 32, 1),
        (_ZERO, _ZERO, -1),
        (_ZERO, _ZERO, 2**32),
        (_ZERO, _ZERO, True),
    ],
)
def test_direct_construction_is_checked(local: object, remote: object, version: object) -> None:
    with pytest.raises(UsageError):
        SafetyNumber(local, remote, version)  # type: ignore[arg-type]


def test_a_private_key_cannot_be_passed_by_mistake() -> None:
    # Only public data goes in: a 32-byte private key is refused, not hashed.
    pair, _ = generate_identity()
    private = pair.getPrivateKey().serialize()
    assert len(private) == 32
    with pytest.raises(UsageError):
        compute_safety_number(private, ALICE_ID, BOB_KEY, BOB_ID, iterations=FAST)


def test_usage_errors_are_e2ee_errors() -> None:
    with pytest.raises(E2EEError):
        compute_safety_number(b"", ALICE_ID, BOB_KEY, BOB_ID)


def test_safety_number_is_immutable(alice: SafetyNumber) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        alice.local_fingerprint = b"\x00" * FINGERPRINT_LENGTH  # type: ignore[misc]


# -- QR renderings (e2ee.qr) ---------------------------------------------------------

_INK = {
    " ": (False, False),
    "\u2580": (True, False),
    "\u2584": (False, True),
    "\u2588": (True, True),
}


def _terminal_modules(text: str) -> list[list[bool]]:
    """Read a terminal rendering back as rows of "has ink" flags."""
    rows: list[list[bool]] = []
    for line in text.split("\n"):
        cells = [_INK[char] for char in line]
        rows.append([top for top, _ in cells])
        rows.append([bottom for _, bottom in cells])
    return rows


def _segno_modules(payload: bytes, border: int) -> list[list[bool]]:
    qr = segno.make_qr(payload, error="m", mode="byte")
    return [[bool(m) for m in row] for row in qr.matrix_iter(scale=1, border=border)]


def _svg_modules(svg: str) -> list[list[bool]]:
    """Read segno's SVG (one stroked path of horizontal runs) back into modules."""
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    group = root.find(f"{ns}g")
    assert group is not None
    scale = int(re.fullmatch(r"scale\((\d+)\)", group.attrib["transform"]).group(1))  # type: ignore[union-attr]
    size = int(root.attrib["width"]) // scale
    background, dark = group.findall(f"{ns}path")
    assert background.attrib["fill"] == "#fff"
    assert dark.attrib["stroke"] == "#000"
    modules = [[False] * size for _ in range(size)]
    x = y = 0.0
    for op, args in re.findall(r"([Mmh])([-\d. ]+)", dark.attrib["d"]):
        numbers = [float(n) for n in args.split()]
        if op == "M":
            x, y = numbers
        elif op == "m":
            x, y = x + numbers[0], y + numbers[1]
        else:
            for column in range(int(x), int(x + numbers[0])):
                modules[int(y)][column] = True
            x += numbers[0]
    return modules


def _decode(modules: list[list[bool]], dark: bool) -> bytes:
    """Decode rows of module flags (``dark``: which flag value is a dark module)."""
    zxingcpp = pytest.importorskip("zxingcpp")
    pixels_per_module = 4
    image = bytearray()
    for row in modules:
        line = b"".join((b"\x00" if flag == dark else b"\xff") * pixels_per_module for flag in row)
        image += line * pixels_per_module
    height = len(modules) * pixels_per_module
    width = len(modules[0]) * pixels_per_module
    view = memoryview(bytes(image)).cast("B", (height, width))
    found = zxingcpp.read_barcodes(view, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=False)
    assert len(found) == 1
    content: bytes = found[0].bytes
    return content


def test_terminal_qr_fits_an_80x24_terminal(alice: SafetyNumber) -> None:
    for border in range(5):
        lines = qr_terminal(alice.scannable, border=border).split("\n")
        assert len(lines) <= 23, "leave a line for the prompt"
        assert {len(line) for line in lines} == {37 + 2 * border}
    default = qr_terminal(alice.scannable).split("\n")
    assert DEFAULT_TERMINAL_BORDER == 2
    assert (len(default), len(default[0])) == (21, 41)


@pytest.mark.parametrize("dark_terminal", [True, False])
def test_terminal_qr_draws_segnos_matrix(alice: SafetyNumber, dark_terminal: bool) -> None:
    text = qr_terminal(alice.scannable, dark_terminal=dark_terminal)
    assert set(text) <= set(_INK) | {"\n"}
    drawn = _terminal_modules(text)
    expected = _segno_modules(alice.scannable, DEFAULT_TERMINAL_BORDER)
    expected.append([False] * len(expected[0]))  # the half row of padding is light
    ink_is_dark = not dark_terminal  # on a dark terminal, the ink draws light modules
    assert drawn == [[module == ink_is_dark for module in row] for row in expected]
    assert qr_terminal(alice.scannable, dark_terminal=dark_terminal) == text


@pytest.mark.parametrize("dark_terminal", [True, False])
def test_terminal_qr_scans_back_to_the_payload(bob: SafetyNumber, dark_terminal: bool) -> None:
    text = qr_terminal(bob.scannable, dark_terminal=dark_terminal)
    payload = _decode(_terminal_modules(text), dark=not dark_terminal)
    assert payload == bob.scannable
    alice = compute_safety_number(ALICE_KEY, ALICE_ID, BOB_KEY, BOB_ID)
    assert alice.matches_scanned(payload)


def test_svg_qr_is_a_standalone_document(alice: SafetyNumber) -> None:
    svg = qr_svg(alice.scannable, scale=8, border=4)
    assert not svg.startswith("<?xml")
    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.attrib["width"] == root.attrib["height"] == str((37 + 8) * 8)
    assert _svg_modules(svg) == _segno_modules(alice.scannable, 4)
    assert qr_svg(alice.scannable) == svg


def test_svg_qr_scans_back_to_the_payload(bob: SafetyNumber) -> None:
    assert _decode(_svg_modules(qr_svg(bob.scannable)), dark=True) == bob.scannable


@pytest.mark.parametrize("payload", [b"", "text", bytearray(b"x"), b"\x00" * 3000])
def test_qr_rejects_bad_payloads(payload: object) -> None:
    with pytest.raises(UsageError):
        qr_terminal(payload)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        qr_svg(payload)  # type: ignore[arg-type]


@pytest.mark.parametrize("border", [-1, 17, True, 2.0])
def test_qr_rejects_bad_borders(alice: SafetyNumber, border: object) -> None:
    with pytest.raises(UsageError):
        qr_terminal(alice.scannable, border=border)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        qr_svg(alice.scannable, border=border)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", [0, 101, True, 1.5])
def test_svg_rejects_bad_scales(alice: SafetyNumber, scale: object) -> None:
    with pytest.raises(UsageError):
        qr_svg(alice.scannable, scale=scale)  # type: ignore[arg-type]
