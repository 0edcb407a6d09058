"""Triton's `nv_inference_*` metrics, read at scrape time from the statistics every model keeps.

The names, labels (`model`, `version`) and units are Triton's, so dashboards built for Triton work
unchanged. Triton writes its counters without a `_total` suffix; the Prometheus client library would add
one to a counter's `# TYPE` line, so they are declared untyped (queries such as `rate()` work the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from gptserve.triton.types import ModelStats, TritonModel

_NS_PER_US = 1000

# name, help, kind, value from a model's statistics
_METRICS: list[tuple[str, str, str, Callable[[ModelStats], float]]] = [
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "untyped",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes", "untyped",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "untyped",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     "untyped", lambda s: s.execution_count),
    ("nv_inference_pending_request_count", "Instantaneous number of pending requests awaiting execution",
     "gauge", lambda s: s.pending),
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     "untyped", lambda s: (s.success.ns + s.fail.ns) // _NS_PER_US),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "untyped",
     lambda s: s.queue.ns // _NS_PER_US),
    ("nv_inference_compute_input_duration_us", "Cumulative compute input duration in microseconds",
     "untyped", lambda s: s.compute_input.ns // _NS_PER_US),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     "untyped", lambda s: s.compute_infer.ns // _NS_PER_US),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds", "untyped",
     lambda s: s.compute_output.ns // _NS_PER_US),
]  # fmt: skip


class TritonMetricsCollector(Collector):
    """Yields Triton's per-model metrics for every model `models()` returns at scrape time."""

    def __init__(self, models: Callable[[], Iterable[TritonModel]]):
        self.models = models

    def collect(self) -> Iterator[Metric]:
        models = list(self.models())
        for name, doc, kind, value in _METRICS:
            family = Metric(name, doc, kind)
            for model in models:
                labels = {"model": model.name, "version": str(model.version)}
                family.add_sample(name, labels, value(model.stats))
            yield family
