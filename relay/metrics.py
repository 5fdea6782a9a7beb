# Invariant: metrics hold counts and sizes only, never identifiers, keys or bodies.
"""Process-wide counters rendered in the Prometheus text exposition format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from relay.store.base import PAUSE_BUCKETS, PauseStats, StoreStats

__all__ = ["Metrics"]


@dataclass(slots=True)
class Metrics:
    """Mutable counters owned by the event loop thread."""

    ws_connections: int = 0
    delivered: int = 0
    ws_slow_disconnects: int = 0
    sends_in_flight: int = 0
    sends_in_flight_peak: int = 0
    ws_read_pauses: int = 0
    ws_frames_direct: int = 0
    ws_sends_rate_limited: int = 0
    redis_wake_calls: int = 0
    redis_woken_devices: int = 0
    redis_resyncs: int = 0
    redis_carried_pushes: int = 0
    redis_push_reads: int = 0
    http_responses: Counter[int] = field(default_factory=Counter)

    def render(self, stats: StoreStats) -> str:
        """Return the Prometheus text for these counters plus the store's.

        Args:
            stats: current store counters.

        Returns:
            Text in the Prometheus exposition format (version 0.0.4).
        """
        lines = [
            "# HELP blindpost_relay_ws_connections Live authenticated WebSocket connections.",
            "# TYPE blindpost_relay_ws_connections gauge",
            f"blindpost_relay_ws_connections {self.ws_connections}",
            "# HELP blindpost_relay_messages_queued Mailbox entries waiting for an ack.",
            "# TYPE blindpost_relay_messages_queued gauge",
            f"blindpost_relay_messages_queued {stats.queued}",
            "# HELP blindpost_relay_messages_accepted_total Messages durably accepted.",
            "# TYPE blindpost_relay_messages_accepted_total counter",
            f"blindpost_relay_messages_accepted_total {stats.accepted}",
            "# HELP blindpost_relay_messages_delivered_total Message frames written to sockets.",
            "# TYPE blindpost_relay_messages_delivered_total counter",
            f"blindpost_relay_messages_delivered_total {self.delivered}",
            "# HELP blindpost_relay_ws_slow_disconnects_total Sockets closed for not reading.",
            "# TYPE blindpost_relay_ws_slow_disconnects_total counter",
            f"blindpost_relay_ws_slow_disconnects_total {self.ws_slow_disconnects}",
            "# HELP blindpost_relay_sends_in_flight WebSocket sends waiting for their commit.",
            "# TYPE blindpost_relay_sends_in_flight gauge",
            f"blindpost_relay_sends_in_flight {self.sends_in_flight}",
            "# HELP blindpost_relay_sends_in_flight_peak Highest sends_in_flight since start.",
            "# TYPE blindpost_relay_sends_in_flight_peak gauge",
            f"blindpost_relay_sends_in_flight_peak {self.sends_in_flight_peak}",
            "# HELP blindpost_relay_ws_read_pauses_total Times a socket was not read because"
            " it had ws_max_inflight_sends sends waiting (back-pressure).",
            "# TYPE blindpost_relay_ws_read_pauses_total counter",
            f"blindpost_relay_ws_read_pauses_total {self.ws_read_pauses}",
            "# HELP blindpost_relay_ws_frames_direct_total SEND and ack frames taken as the"
            " parser produced them (ws_direct_frames), without a task wake-up each.",
            "# TYPE blindpost_relay_ws_frames_direct_total counter",
            f"blindpost_relay_ws_frames_direct_total {self.ws_frames_direct}",
            "# HELP blindpost_relay_ws_sends_rate_limited_total WebSocket sends answered 429"
            " (send_rate, account_send_rate, account_max_inflight_sends...); each pauses its"
            " socket's reading.",
            "# TYPE blindpost_relay_ws_sends_rate_limited_total counter",
            f"blindpost_relay_ws_sends_rate_limited_total {self.ws_sends_rate_limited}",
            "# HELP blindpost_relay_store_commits_total Write transactions committed (group"
            " commits).",
            "# TYPE blindpost_relay_store_commits_total counter",
            f"blindpost_relay_store_commits_total {stats.commits}",
            "# HELP blindpost_relay_store_committed_ops_total Write operations (sends, acks, ...)"
            " in those commits; divided by the commits: the mean batch size.",
            "# TYPE blindpost_relay_store_committed_ops_total counter",
            f"blindpost_relay_store_committed_ops_total {stats.committed_ops}",
            "# HELP blindpost_relay_store_loop_staged_total Sends the event loop staged into an"
            " open write transaction itself (sqlite_loop_staging), not through the writer thread.",
            "# TYPE blindpost_relay_store_loop_staged_total counter",
            f"blindpost_relay_store_loop_staged_total {stats.loop_staged}",
            "# HELP blindpost_relay_blob_bytes Bytes of stored blobs.",
            "# TYPE blindpost_relay_blob_bytes gauge",
            f"blindpost_relay_blob_bytes {stats.blob_bytes}",
            "# HELP blindpost_relay_redis_wake_calls_total Redis calls (round trips) made to wake"
            " other relay nodes after commits (0 on a single node).",
            "# TYPE blindpost_relay_redis_wake_calls_total counter",
            f"blindpost_relay_redis_wake_calls_total {self.redis_wake_calls}",
            "# HELP blindpost_relay_redis_woken_devices_total Recipient devices those calls named.",
            "# TYPE blindpost_relay_redis_woken_devices_total counter",
            f"blindpost_relay_redis_woken_devices_total {self.redis_woken_devices}",
            "# HELP blindpost_relay_redis_resyncs_total Times this node re-subscribed to Redis"
            " and re-read every live socket's mailbox.",
            "# TYPE blindpost_relay_redis_resyncs_total counter",
            f"blindpost_relay_redis_resyncs_total {self.redis_resyncs}",
            "# HELP blindpost_relay_redis_carried_pushes_total Messages pushed straight from"
            " another node's wake-up, without a store read.",
            "# TYPE blindpost_relay_redis_carried_pushes_total counter",
            f"blindpost_relay_redis_carried_pushes_total {self.redis_carried_pushes}",
            "# HELP blindpost_relay_redis_push_reads_total Mailbox reads made to push messages"
            " committed by other nodes (wake-ups without a usable carried message, resyncs, the"
            " safety poll).",
            "# TYPE blindpost_relay_redis_push_reads_total counter",
            f"blindpost_relay_redis_push_reads_total {self.redis_push_reads}",
            "# HELP blindpost_relay_http_responses_total HTTP responses by status.",
            "# TYPE blindpost_relay_http_responses_total counter",
        ]
        for status, n in sorted(self.http_responses.items()):
            lines.append(f'blindpost_relay_http_responses_total{{status="{status}"}} {n}')
        if stats.writer_pauses:
            lines += _pause_lines(stats.writer_pauses)
        return "\n".join(lines) + "\n"


def _pause_lines(pauses: tuple[PauseStats, ...]) -> list[str]:
    """The writer-pause histogram (``StoreStats.writer_pauses``), one series per step."""
    name = "blindpost_relay_store_writer_pause_seconds"
    lines = [
        f"# HELP {name} How long the SQLite writer held every write behind it, by step: its own"
        " checkpoint between transactions, and a transaction's closing steps up to COMMIT.",
        f"# TYPE {name} histogram",
    ]
    for p in pauses:
        total = 0
        for bound, n in zip(PAUSE_BUCKETS, p.counts, strict=False):
            total += n
            lines.append(f'{name}_bucket{{step="{p.step}",le="{bound}"}} {total}')
        total += p.counts[-1]
        lines.append(f'{name}_bucket{{step="{p.step}",le="+Inf"}} {total}')
        lines.append(f'{name}_sum{{step="{p.step}"}} {p.seconds:.6f}')
        lines.append(f'{name}_count{{step="{p.step}"}} {total}')
    return lines
