"""The daemon's framing and event queue, without processes: the limits at their edges."""

from __future__ import annotations

from tui_client.cli import EventOutput
from tui_client.daemon import TOO_LONG, EventQueue, LineSplitter


def test_lines_split_across_chunks_and_the_line_limit() -> None:
    splitter = LineSplitter(max_line=8)
    assert splitter.feed(b'{"a"') == []
    assert splitter.feed(b":1}\n{}\n{") == [b'{"a":1}', b"{}"]
    # Exactly the limit passes; one byte more is TOO_LONG, reported once, then skipped.
    assert splitter.feed(b"}\n12345678\n") == [b"{}", b"12345678"]
    assert splitter.feed(b"123456789") == [TOO_LONG]
    assert splitter.feed(b"more of the same line") == []
    assert splitter.feed(b"still\nnext\n") == [b"next"]
    assert splitter.feed(b"123456789\n") == [TOO_LONG]
    # At EOF an unterminated last line still counts.
    assert splitter.feed(b"tail") == []
    assert splitter.feed(b"") == [b"tail"]


def _event(n: int) -> EventOutput:
    return EventOutput({"type": "change", "n": n}, f"event {n}", seq=n)


def test_event_queue_numbers_confirms_and_drops_the_oldest_past_its_limit() -> None:
    queue = EventQueue(limit=3)
    for n in range(1, 4):
        queue.put(_event(n))
    assert [number for number, _ in queue.after(0, 10)] == [1, 2, 3]
    assert [number for number, _ in queue.after(1, 1)] == [2]
    assert [e.seq for e in queue.confirm(1)] == [1]
    assert queue.done == 1 and len(queue) == 2
    queue.put(_event(4))
    queue.put(_event(5))  # full: event 2 is dropped and counts as done
    assert queue.dropped == 1 and queue.done == 2
    assert [number for number, _ in queue.after(queue.done, 10)] == [3, 4, 5]
    assert queue.last == 5
    assert queue.confirm(5) and len(queue) == 0 and queue.after(0, 10) == []
