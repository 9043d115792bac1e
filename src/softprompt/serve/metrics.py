"""What /metrics reports: response counts and latencies (fixed-size counters), and the Prometheus text of them
with the scheduler's and the registry's numbers."""

from __future__ import annotations

import os
import threading

from ..scheduler import Scheduler
from .registry import PromptRegistry


class Metrics:
    """Counters for /metrics (Prometheus text format). Fixed-size: nothing grows per request."""

    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/admin")

    def __init__(self):
        self.lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.latency = [0] * len(self.BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def record(self, path: str, status: int, seconds: float) -> None:
        route = next((r for r in self.ROUTES if path == r or path.startswith(r + "/")), "other")
        with self.lock:
            self.responses[(route, status)] = self.responses.get((route, status), 0) + 1
            if route in ("/v1/completions", "/v1/chat/completions") and status == 200:
                for i, b in enumerate(self.BUCKETS):
                    if seconds <= b:
                        self.latency[i] += 1
                self.latency_sum += seconds
                self.latency_count += 1


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


STAT_COUNTERS = [("generated_tokens", "tokens generated"), ("prompt_tokens", "input tokens prefilled"),
                 ("decode_steps", "decode forward passes"), ("decode_rows", "rows summed over decode steps"),
                 ("prefills", "prefill forward passes"), ("prefix_cache_hits", "prefix cache hits"),
                 ("prefix_cache_misses", "prefix cache misses (prefix computed)"),
                 ("sequences_finished", "sequences finished"), ("sequences_cancelled", "sequences cancelled"),
                 ("sequences_timed_out", "sequences timed out"), ("sequences_failed", "sequences failed")]
# metric name -> the scheduler's stats key, where they differ
STAT_KEYS = {"sequences_finished": "finished", "sequences_cancelled": "cancelled", "sequences_timed_out": "timeouts",
             "sequences_failed": "errors"}


def prometheus_text(m: Metrics, scheduler: Scheduler, registry: PromptRegistry) -> str:
    """The /metrics body (Prometheus text format 0.0.4)."""
    st = scheduler.stats
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP softprompt_{name} {help_}")
        lines.append(f"# TYPE softprompt_{name} {kind}")
        for labels, value in samples:
            lines.append(f"softprompt_{name}{labels} {value}")

    metric("running_sequences", "gauge", "sequences in the decode batch", [("", scheduler.n_running)])
    metric("waiting_sequences", "gauge", "sequences queued", [("", scheduler.n_waiting)])
    metric("prompts_loaded", "gauge", "soft prompts loaded", [("", len(registry.entries))])
    metric("prompt_load_errors", "gauge", "prompt folders that failed to load", [("", len(registry.errors))])
    for key, help_ in STAT_COUNTERS:
        metric(f"{key}_total", "counter", help_, [("", st[STAT_KEYS.get(key, key)])])
    with m.lock:
        metric("http_responses_total", "counter", "HTTP responses by route and status",
               [(f'{{route="{r}",status="{s}"}}', n) for (r, s), n in sorted(m.responses.items())])
        lines.append("# HELP softprompt_request_seconds latency of successful generation requests")
        lines.append("# TYPE softprompt_request_seconds histogram")
        for b, n in zip(m.BUCKETS, m.latency):
            lines.append(f'softprompt_request_seconds_bucket{{le="{"+Inf" if b == float("inf") else b}"}} {n}')
        lines.append(f"softprompt_request_seconds_sum {m.latency_sum:.6f}")
        lines.append(f"softprompt_request_seconds_count {m.latency_count}")
    metric("resident_memory_bytes", "gauge", "resident memory of the server process", [("", rss_bytes())])
    return "\n".join(lines) + "\n"
