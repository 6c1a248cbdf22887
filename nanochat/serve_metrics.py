"""Prometheus metrics of `nanochat serve` (GET /metrics), through prometheus_client.

The names, types, labels (`model_name`) and histogram buckets are the ones vLLM exports, so
dashboards and alerts written for vLLM work unchanged; what vLLM has no name for is `nanochat:`.
One registry per app (tests run several apps in one process). The scheduler thread records
requests as they finish; the gauges are read from the scheduler when the page is scraped.
"""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, model_name):
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        m = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests being decoded (KV-cache rows in use).", m,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a row.", m, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Share of KV-cache rows in use (1 = all).", m, registry=r)
        self.kv_rows = Gauge("nanochat:kv_cache_rows", "KV-cache rows, by state.", m + ["state"], registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason "
                               "(stop, length; error: a failed generation; abort: the client left).",
                               m + ["finished_reason"], registry=r)
        self.rejected = Counter("nanochat:requests_rejected", "Requests refused at the door, by HTTP status "
                                "(503: the queue was full).", m + ["status"], registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Seconds from arrival to the first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Mean seconds between a request's tokens "
                              "after the first.", m, buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Seconds from arrival to the last token.", m,
                             buckets=E2E_BUCKETS, registry=r)
        # series exist from the start (a dashboard shows 0, not "no data")
        for c in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot, self.e2e):
            c.labels(model_name)
        for reason in ("stop", "length", "error", "abort"):
            self.success.labels(model_name, reason)
        self.rejected.labels(model_name, "503")

    # -- recorded by the scheduler thread -------------------------------------------------------

    def admitted(self, job):
        self.prompt_tokens.labels(self.model_name).inc(len(job.prompt))

    def token(self, job):
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
            self.ttft.labels(self.model_name).observe(now - job.arrived)
        job.last_token_at = now
        job.n_tokens += 1
        self.generation_tokens.labels(self.model_name).inc()

    def finished(self, job, reason):
        """reason: stop | length | error | abort. Latencies only of requests that ended normally."""
        self.success.labels(self.model_name, reason).inc()
        if reason in ("error", "abort"):
            return
        self.e2e.labels(self.model_name).observe(time.monotonic() - job.arrived)
        if job.first_token_at is None:
            return
        if job.n_tokens > 1:
            self.tpot.labels(self.model_name).observe((job.last_token_at - job.first_token_at) / (job.n_tokens - 1))

    def refused(self, status):
        self.rejected.labels(self.model_name, str(status)).inc()

    # -- read when scraped ----------------------------------------------------------------------

    def render(self, running, waiting, rows):
        """The text exposition format, with the gauges set from the scheduler's state now."""
        name = self.model_name
        self.running.labels(name).set(running)
        self.waiting.labels(name).set(waiting)
        self.kv_usage.labels(name).set(running / rows if rows else 0.0)
        self.kv_rows.labels(name, "used").set(running)
        self.kv_rows.labels(name, "free").set(rows - running)
        return generate_latest(self.registry)
