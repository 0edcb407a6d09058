"""`gptserve bench load`, scaled down: a real server on loopback under concurrent clients, some of which
disconnect mid-stream, answers no 5xx, reproduces the offline engine's greedy outputs, keeps its RSS
flat and ends with no request running and no KV block in use."""

from __future__ import annotations

import argparse
import json

from gptserve.bench import load
from gptserve.cli import main


def test_load_test_passes_at_100_requests(tmp_path) -> None:
    out = tmp_path / "load.json"
    rc = main(["--log-level", "warning", "bench", "load", "--num-requests", "100", "--concurrency", "32",
               "--num-prompts", "16", "--json", str(out)])  # fmt: skip
    figures = json.loads(out.read_text())
    assert rc == 0 and figures["passed"], figures
    assert figures["statuses"] == {"200": 100} and figures["disconnected"] == 10
    assert figures["outputs_checked"] == 90 and figures["mismatches"] == 0
    assert figures["final_metrics"]["vllm:kv_cache_usage_perc"] == 0.0


def test_check_reports_every_broken_promise() -> None:
    job = load.Job(0, [1, 2], 2, stream=False, disconnect=False)
    report = load.LoadReport(
        [load.Outcome(job, 200, [3, 4]), load.Outcome(job, 503, None), load.Outcome(job, None, None)],
        elapsed=1.0,
        rss_samples=[(0, 100), (1, 120)],
        final_metrics={"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0,
                       "vllm:kv_cache_usage_perc": 0.25},
    )  # fmt: skip
    failures = load.check(report, [[3, 5]], num_prompts=1, tolerance=0.10)
    assert len(failures) == 4, failures
    assert "5xx" in failures[0] and "reference" in failures[1] and "RSS" in failures[2]
    assert "idle" in failures[3]
    assert isinstance(load.summary(report, [job]), dict)


def test_jobs_mix_streams_and_disconnects() -> None:
    args = argparse.Namespace(num_requests=100, num_prompts=8, min_output_len=4, max_output_len=9,
                              disconnect_every=10)  # fmt: skip
    jobs, prompts, lens = load.make_jobs(args, vocab=512)
    assert len(jobs) == 100 and len(prompts) == 8 and all(4 <= n <= 9 for n in lens)
    assert sum(j.disconnect for j in jobs) == 10 and all(j.stream for j in jobs if j.disconnect)
    assert 40 <= sum(j.stream and not j.disconnect for j in jobs) <= 50
