"""Prometheus metrics (prefix `s1serve_`), plus the three gauges routers and autoscalers read
under vLLM's names. One registry per server, so tests can run several servers in one process.

Buckets suit reasoning workloads: thinking up to 32k tokens, latencies up to 10 minutes.
Feedback outcomes carry the think-token bucket of the graded request as a label, so accuracy
against thinking tokens is one PromQL ratio:
    sum by (think_bucket) (s1serve_feedback_total{outcome="correct"}) / sum by (think_bucket) (s1serve_feedback_total)
"""

import bisect

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def think_bucket(think_tokens: int) -> str:
    """The upper edge of the TOKEN_BUCKETS bucket holding `think_tokens` ("0" for none, "+Inf" above)."""
    if think_tokens <= 0:
        return "0"
    i = bisect.bisect_left(TOKEN_BUCKETS, think_tokens)
    return str(TOKEN_BUCKETS[i]) if i < len(TOKEN_BUCKETS) else "+Inf"


class Metrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        m = ["model"]
        self.model = model
        self.running = Gauge("s1serve_requests_running", "Requests being computed", m, registry=r)
        self.waiting = Gauge("s1serve_requests_waiting", "Requests admitted, waiting to be scheduled", m, registry=r)
        self.kv_usage = Gauge("s1serve_kv_cache_usage_ratio", "Fraction of KV blocks in use", m, registry=r)
        self.prefix_hit = Gauge("s1serve_prefix_cache_hit_ratio", "Prompt tokens served by the prefix cache / looked up", m, registry=r)
        self.preemptions = Gauge("s1serve_preemptions", "Sequences preempted by recompute since start", m, registry=r)
        self.vllm_running = Gauge("vllm:num_requests_running", "Running requests (vLLM name)", m, registry=r)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Waiting requests (vLLM name)", m, registry=r)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage 0..1 (vLLM name)", m, registry=r)
        # The name vLLM used before 0.10, which older inference-gateway endpoint pickers still read.
        self.vllm_gpu_kv = Gauge("vllm:gpu_cache_usage_perc", "KV-cache usage 0..1 (older vLLM name)", m, registry=r)

        self.requests = Counter("s1serve_requests", "Finished requests", [*m, "finish_reason", "budgeted"], registry=r)
        self.rejected = Counter("s1serve_requests_rejected", "Requests refused before the engine", [*m, "reason"], registry=r)
        self.prompt_tokens = Counter("s1serve_prompt_tokens", "Prompt tokens", m, registry=r)
        self.think_tokens = Counter("s1serve_think_tokens", "Thinking tokens (inserted Waits included)", m, registry=r)
        self.answer_tokens = Counter("s1serve_answer_tokens", "Answer tokens", m, registry=r)
        self.waits = Counter("s1serve_wait_insertions", "Waits inserted by budget forcing", m, registry=r)
        self.forced_ends = Counter("s1serve_think_end_forced", "Think phases ended at max_think", m, registry=r)
        self.feedback = Counter("s1serve_feedback", "Graded outcomes", [*m, "outcome", "think_bucket"], registry=r)
        self.probes = Counter("s1serve_adaptive_probes", "Adaptive-thinking probes run", m, registry=r)
        self.probe_tokens = Counter("s1serve_adaptive_probe_tokens", "Tokens the probes generated", m, registry=r)
        self.adaptive_stops = Counter("s1serve_adaptive_stops", "Samples whose thinking the probes ended", m, registry=r)
        self.samples_hist = Histogram("s1serve_request_samples", "Samples per request (n)", m,
                                      buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.vote_agreement = Histogram("s1serve_vote_agreement_ratio", "Majority count / n of voted requests", m,
                                        buckets=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), registry=r)

        self.prompt_hist = Histogram("s1serve_request_prompt_tokens", "Prompt tokens per request", m, buckets=TOKEN_BUCKETS, registry=r)
        self.think_hist = Histogram("s1serve_request_think_tokens", "Thinking tokens per request", m, buckets=TOKEN_BUCKETS, registry=r)
        self.answer_hist = Histogram("s1serve_request_answer_tokens", "Answer tokens per request", m, buckets=TOKEN_BUCKETS, registry=r)
        self.ttft = Histogram("s1serve_time_to_first_token_seconds", "Arrival to first token", m, buckets=LATENCY_BUCKETS, registry=r)
        self.ttfat = Histogram("s1serve_time_to_first_answer_token_seconds", "Arrival to first answer token", m, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("s1serve_inter_token_latency_seconds", "Between consecutive streamed deltas", [*m, "phase"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("s1serve_e2e_request_latency_seconds", "Arrival to last token", m, buckets=LATENCY_BUCKETS, registry=r)

        # Export every series from the start (at 0), so dashboards and alerts see them before traffic.
        for metric in (self.probes, self.probe_tokens, self.adaptive_stops, self.samples_hist, self.vote_agreement,
                       self.prompt_tokens, self.think_tokens, self.answer_tokens, self.waits, self.forced_ends,
                       self.prompt_hist, self.think_hist, self.answer_hist, self.ttft, self.ttfat, self.e2e):
            metric.labels(model)
        for outcome in ("correct", "incorrect"):
            self.feedback.labels(model, outcome, "0")

    def set_load(self, running: int, waiting: int, kv_usage: float, prefix_hit: float, preemptions: int) -> None:
        model = self.model
        for gauge, value in ((self.running, running), (self.vllm_running, running), (self.waiting, waiting),
                             (self.vllm_waiting, waiting), (self.kv_usage, kv_usage), (self.vllm_kv, kv_usage), (self.vllm_gpu_kv, kv_usage),
                             (self.prefix_hit, prefix_hit), (self.preemptions, preemptions)):
            gauge.labels(model).set(value)
