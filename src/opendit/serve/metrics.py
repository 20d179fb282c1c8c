"""Prometheus metrics of `opendit serve` (GET /metrics, text exposition format), on a registry of their own."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
IMAGES_WINDOW_S = 60.0  # images/s over the last minute


class ServeMetrics:
    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.started = time.time()
        self.queue_length = Gauge("opendit_queue_length", "jobs waiting in the queue", registry=registry)
        self.requests = Counter(
            "opendit_requests", "jobs by final status (done, failed, rejected)", ["status"], registry=registry
        )
        self.latency = Histogram(
            "opendit_request_latency_seconds", "submit to done, per job", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.images = Counter("opendit_images", "images (or videos) generated", registry=registry)
        self.images_per_s = Gauge(
            "opendit_images_per_second", f"images over the last {IMAGES_WINDOW_S:.0f} s", registry=registry
        )
        self.batch_images = Histogram(
            "opendit_batch_images", "images per denoising loop", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.busy = Gauge("opendit_rank_busy_fraction", "share of uptime a rank spent sampling", ["rank"],
                          registry=registry)  # fmt: skip
        self.bytes_sent = Counter("opendit_comm_bytes_sent", "bytes a rank sent to other ranks", ["rank"],
                                  registry=registry)  # fmt: skip
        self.restarts = Counter("opendit_worker_restarts", "times the workers were restarted", registry=registry)
        self._busy_s: dict[int, float] = {}
        self._recent: deque[tuple[float, int]] = deque()

    def observe_batch(self, batch, results, seconds: float) -> None:
        """A finished batch: its jobs' latencies, images, and every rank's sampling time and bytes sent."""
        now = time.time()
        for job in batch:
            self.requests.labels(status="done").inc()
            self.latency.observe(now - job.created)
        count = sum(len(result.images) for result in results)
        self.images.inc(count)
        self.batch_images.observe(count)
        self._recent.append((now, count))
        record = results[0].record
        for rank in record.get("ranks") or [{"rank": 0, "sampling_s": record["timing"]["sampling_s"]}]:
            self._busy_s[rank["rank"]] = self._busy_s.get(rank["rank"], 0.0) + rank["sampling_s"]
            self.bytes_sent.labels(rank=str(rank["rank"])).inc(_bytes_sent(rank))

    def render(self) -> bytes:
        now = time.time()
        while self._recent and self._recent[0][0] < now - IMAGES_WINDOW_S:
            self._recent.popleft()
        window = min(IMAGES_WINDOW_S, max(now - self.started, 1e-9))
        self.images_per_s.set(sum(count for _, count in self._recent) / window)
        for rank, busy in self._busy_s.items():
            self.busy.labels(rank=str(rank)).set(busy / max(now - self.started, 1e-9))
        return generate_latest(self.registry)


def _bytes_sent(rank: dict) -> int:
    """One rank's payload bytes of one call: every step's ops and the gather after sampling."""
    total = 0
    for step in rank.get("comm_per_step") or []:
        total += sum(counts["bytes"] for counts in step.values())
    total += sum(counts.get("bytes", 0) for counts in (rank.get("comm_after_sampling") or {}).values())
    return int(total)
