"""The Scheduler on a real KVCacheManager, no model: admission under `max_num_seqs` and the token budget,
chunked prefill, prefix-cache hits, which request is preempted when blocks run out and how it recomputes,
requests that can never fit, and that every block is free once everything finished."""

from __future__ import annotations

import pytest

from gptserve.config import SchedulerConfig
from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.scheduler import SampledToken, Scheduler, SchedulerOutput
from gptserve.engine.sequence import Request, RequestStatus, Sequence
from gptserve.sampling_params import SamplingParams

BS = 4  # tokens a block


def make_scheduler(num_blocks: int = 64, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), KVCacheManager(num_blocks, BS))


def make_request(name: str, prompt: list[int] | range, max_tokens: int = 4, n: int = 1) -> Request:
    prompt = list(prompt)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(name, prompt, params, [Sequence(list(prompt), len(prompt))])


def next_token(seq: Sequence) -> int:
    """The "sampled" token: a function of the sequence alone, so a recomputed request samples the same."""
    return 1000 + 10 * seq.index + seq.num_tokens


def apply_step(scheduler: Scheduler, out: SchedulerOutput) -> list[Request]:
    """What the engine core does with a scheduled step once the model ran: fail the requests that can
    never fit, record the computed tokens (`Scheduler.record_computed`), fork an n > 1 request at its
    first sampling point, and hand every sampling sequence's token to `Scheduler.update`, which appends
    it, ends the sequences that reached `max_tokens` (freeing their blocks) and finishes requests with
    none left. Returns the requests that finished."""
    kv = scheduler.kv
    finished = []
    for request in out.failed:
        for seq in request.live_seqs:
            seq.finish_reason = "abort"
        scheduler.finish(request)
        finished.append(request)
    scheduler.record_computed(out.scheduled)
    sampling: dict[Request, list[Sequence]] = {}
    for item in out.scheduled:
        if item.sample:
            sampling.setdefault(item.request, []).append(item.seq)
    sampled = []
    for request, seqs in sampling.items():
        if not request.forked:
            request.forked = True
            parent = seqs[0]
            for i in range(1, request.params.n):
                child = parent.fork(i, None)
                kv.share(child)
                request.seqs.append(child)
                seqs.append(child)
        sampled += [SampledToken(request, seq, next_token(seq), 0.0, None) for seq in seqs]
    scheduler.update(sampled)
    finished += [request for request in sampling if request.finished]
    return finished


def run_to_completion(scheduler: Scheduler, max_steps: int = 1000) -> list[SchedulerOutput]:
    outs = []
    while scheduler.has_unfinished():
        assert len(outs) < max_steps, "the scheduler made no progress"
        out = scheduler.schedule()
        apply_step(scheduler, out)
        outs.append(out)
    return outs


def planned(out: SchedulerOutput) -> dict[str, list[tuple[int, bool]]]:
    """request id -> (num_new_tokens, sample) of each of its scheduled sequences."""
    plan: dict[str, list[tuple[int, bool]]] = {}
    for item in out.scheduled:
        plan.setdefault(item.request.request_id, []).append((item.num_new_tokens, item.sample))
    return plan


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    kv = scheduler.kv
    assert not scheduler.has_unfinished()
    assert kv.num_free_blocks == kv.num_blocks and kv.ref_counts == [0] * kv.num_blocks


# ----------------------------------------------------------------------------------- admission, budget
def test_prefill_then_decode_and_every_block_back():
    sched = make_scheduler()
    a = make_request("a", range(10), max_tokens=3)
    sched.add(a)
    out = sched.schedule()
    assert planned(out) == {"a": [(10, True)]} and out.num_tokens == 10
    assert a.status is RequestStatus.RUNNING and sched.running == [a] and not sched.waiting
    assert len(a.seqs[0].block_ids) == 3
    apply_step(sched, out)
    for _ in range(2):
        out = sched.schedule()
        assert planned(out) == {"a": [(1, True)]}
        apply_step(sched, out)
    assert a.finished and a.seqs[0].output_token_ids == [1010, 1011, 1012]
    assert_all_blocks_free(sched)


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", range(10 * i, 10 * i + 5), max_tokens=2) for i in range(3)]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert set(planned(out)) == {"r0", "r1"} and list(sched.waiting) == [reqs[2]]
    apply_step(sched, out)
    out = sched.schedule()  # both still decode: r2 still waits
    assert set(planned(out)) == {"r0", "r1"}
    apply_step(sched, out)  # both reach max_tokens and finish
    out = sched.schedule()
    assert set(planned(out)) == {"r2"}
    run_to_completion(sched)
    assert_all_blocks_free(sched)


def test_max_num_seqs_counts_every_sample_of_a_forked_request():
    sched = make_scheduler(max_num_seqs=3)
    wide = make_request("wide", range(6), max_tokens=3, n=3)
    sched.add(wide)
    apply_step(sched, sched.schedule())
    assert len(wide.seqs) == 3 and sched.num_running_seqs() == 3
    late = make_request("late", range(60, 64))
    sched.add(late)
    out = sched.schedule()  # three samples fill the running set: the newcomer waits until they finish
    assert set(planned(out)) == {"wide"} and list(sched.waiting) == [late]
    run_to_completion(sched)
    assert wide.finished and late.finished
    assert_all_blocks_free(sched)


def test_long_prompt_is_chunked_under_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_request("a", range(40), max_tokens=2)
    sched.add(a)
    chunks = []
    while not a.seqs[0].output_token_ids:
        out = sched.schedule()
        assert out.num_tokens <= 16
        chunks.extend(planned(out)["a"])
        apply_step(sched, out)
    assert chunks == [(16, False), (16, False), (8, True)]
    run_to_completion(sched)
    assert_all_blocks_free(sched)


def test_running_requests_come_first_and_a_newcomer_gets_the_rest_of_the_budget():
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = make_request("a", range(8), max_tokens=5), make_request("b", range(100, 130), max_tokens=2)
    sched.add(a)
    apply_step(sched, sched.schedule())  # a's prompt, then a decodes
    sched.add(b)
    out = sched.schedule()
    assert planned(out) == {"a": [(1, True)], "b": [(15, False)]}
    apply_step(sched, out)
    out = sched.schedule()
    assert planned(out) == {"a": [(1, True)], "b": [(15, True)]}
    run_to_completion(sched)
    assert_all_blocks_free(sched)


# --------------------------------------------------------------------------------------- prefix cache
def test_second_request_with_the_same_prompt_hits_the_prefix_cache():
    sched = make_scheduler()
    prompt = list(range(500, 514))  # three full blocks and two tokens
    first = make_request("first", prompt)
    sched.add(first)
    apply_step(sched, sched.schedule())  # its prompt is computed: its full blocks are cached
    second = make_request("second", prompt)
    sched.add(second)
    out = sched.schedule()
    assert planned(out) == {"first": [(1, True)], "second": [(2, True)]}
    assert second.num_cached_tokens == 12 and first.num_cached_tokens == 0
    assert second.seqs[0].block_ids[:3] == first.seqs[0].block_ids[:3]
    run_to_completion(sched)
    assert first.seqs[0].output_token_ids == second.seqs[0].output_token_ids
    assert_all_blocks_free(sched)


def test_same_prompt_admitted_in_the_same_step_finds_nothing_cached_yet():
    sched = make_scheduler()
    prompt = list(range(500, 514))
    a, b = make_request("a", prompt), make_request("b", prompt)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert planned(out) == {"a": [(14, True)], "b": [(14, True)]}
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    run_to_completion(sched)
    assert_all_blocks_free(sched)


# --------------------------------------------------------------------------------- n > 1 and preemption
def test_forked_samples_copy_the_shared_partial_block_on_their_first_write():
    sched = make_scheduler()
    r = make_request("r", range(6), max_tokens=3, n=2)  # one full block and a partial one
    sched.add(r)
    apply_step(sched, sched.schedule())
    s0, s1 = r.seqs
    assert s0.block_ids == s1.block_ids and s0.token_ids != s1.token_ids
    full, partial = s0.block_ids
    out = sched.schedule()
    assert planned(out) == {"r": [(1, True), (1, True)]}
    assert len(out.block_copies) == 1 and out.block_copies[0][0] == partial
    copy = out.block_copies[0][1]
    assert {tuple(s0.block_ids), tuple(s1.block_ids)} == {(full, partial), (full, copy)}
    assert sched.kv.ref_counts[full] == 2 and sched.kv.ref_counts[partial] == sched.kv.ref_counts[copy] == 1
    apply_step(sched, out)
    run_to_completion(sched)
    assert [len(s.output_token_ids) for s in r.seqs] == [3, 3]
    assert_all_blocks_free(sched)


def test_forked_request_that_fits_exactly_is_not_failed():
    # Two samples of a 6-token prompt, 8 tokens each: the shared full block and one partial block each.
    sched = make_scheduler(num_blocks=3)
    r = make_request("r", range(6), max_tokens=2, n=2)
    sched.add(r)
    run_to_completion(sched)
    assert r.error is None and [len(s.output_token_ids) for s in r.seqs] == [2, 2]
    assert_all_blocks_free(sched)


def test_out_of_blocks_preempts_the_most_recently_admitted_request():
    # 5 blocks of 4 tokens. a's prompt fills one block exactly, b's and c's take two each: all five.
    sched = make_scheduler(num_blocks=5)
    a = make_request("a", range(4), max_tokens=3)
    b = make_request("b", range(100, 106), max_tokens=3)
    c = make_request("c", range(200, 206), max_tokens=3)
    for r in (a, b, c):
        sched.add(r)
    apply_step(sched, sched.schedule())
    assert sched.running == [a, b, c] and sched.kv.num_free_blocks == 0
    c_output = list(c.seqs[0].output_token_ids)

    out = sched.schedule()  # a's fifth token needs a second block and none is free: c, admitted last, goes
    assert out.preempted == [c]
    assert planned(out) == {"a": [(1, True)], "b": [(1, True)]}
    assert c.status is RequestStatus.WAITING and sched.waiting[0] is c
    assert c.seqs[0].block_ids == [] and c.seqs[0].num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    assert c.seqs[0].output_token_ids == c_output  # it keeps what it generated
    apply_step(sched, out)

    # c comes back once there is room and recomputes its prompt and its token in one step.
    recomputed = []
    while not c.finished:
        out = sched.schedule()
        if "c" in planned(out) and not recomputed:
            recomputed = planned(out)["c"]
            cached = c.seqs[0].num_computed_tokens
        apply_step(sched, out)
    assert recomputed == [(7 - cached, True)]
    assert c.seqs[0].output_token_ids == [1006, 1007, 1008]  # as if it had never been preempted
    run_to_completion(sched)
    assert a.num_preemptions == b.num_preemptions == 0
    assert_all_blocks_free(sched)


def test_preempted_n_way_request_recomputes_its_samples_together():
    sched = make_scheduler(max_num_batched_tokens=5)
    r = make_request("r", range(10), max_tokens=4, n=2)
    sched.add(r)
    while len(r.seqs[0].output_token_ids) < 2:
        apply_step(sched, sched.schedule())
    outputs = [list(s.output_token_ids) for s in r.seqs]
    sched.running.remove(r)  # preempt() only frees and requeues: the caller takes it off the running set
    sched.preempt(r)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert list(sched.waiting) == [r] and all(s.block_ids == [] for s in r.seqs)
    steps = []
    while all(len(s.output_token_ids) == 2 for s in r.seqs):
        out = sched.schedule()
        assert out.num_tokens <= 5
        steps.append(planned(out)["r"])
        apply_step(sched, out)
    # The budget cannot hold both: each advances to one token short of its end, then both sample at once.
    assert len(steps) >= 2
    assert all(not sample for step in steps[:-1] for _, sample in step)
    assert [sample for _, sample in steps[-1]] == [True, True]
    assert [s.output_token_ids[:2] for s in r.seqs] == outputs
    run_to_completion(sched)
    assert_all_blocks_free(sched)


# ---------------------------------------------------------------------------------- never fits: fails
def test_prompt_larger_than_the_whole_cache_fails():
    sched = make_scheduler(num_blocks=4)  # 16 token slots
    big = make_request("big", range(20))
    sched.add(big)
    out = sched.schedule()
    assert out.failed == [big] and not out.scheduled
    assert "more KV cache than the whole cache holds (4 blocks of 4 tokens)" in big.error
    apply_step(sched, out)
    assert big.finished
    assert_all_blocks_free(sched)


def test_request_that_outgrows_the_cache_alone_fails_while_others_keep_going():
    sched = make_scheduler(num_blocks=4)
    grower = make_request("grower", range(12), max_tokens=10)  # 22 tokens: more than 16 slots
    sched.add(grower)
    failed = []
    for out in run_to_completion(sched):
        failed.extend(out.failed)
    assert failed == [grower] and grower.error
    assert grower.seqs[0].num_tokens == 17  # 16 computed tokens filled the cache; the 17th found no room
    assert_all_blocks_free(sched)


def test_oversized_request_waits_for_running_ones_then_fails():
    sched = make_scheduler(num_blocks=4)
    small = make_request("small", range(4), max_tokens=2)
    big = make_request("big", range(100, 120))
    sched.add(small)
    out = sched.schedule()
    sched.add(big)
    apply_step(sched, out)
    out = sched.schedule()
    assert not out.failed and list(sched.waiting) == [big]
    apply_step(sched, out)  # small finishes
    assert small.finished and small.error is None
    out = sched.schedule()
    assert out.failed == [big]
    apply_step(sched, out)
    assert_all_blocks_free(sched)


# ------------------------------------------------------------------------------------------- finishing
def test_finish_aborts_waiting_and_running_requests_and_frees_their_blocks():
    sched = make_scheduler(max_num_seqs=3)  # the two samples and "other"
    forked = make_request("forked", range(6), max_tokens=50, n=2)
    other = make_request("other", range(50, 70), max_tokens=50)
    queued = make_request("queued", range(80, 90), max_tokens=50)
    for r in (forked, other, queued):
        sched.add(r)
    apply_step(sched, sched.schedule())
    assert list(sched.waiting) == [queued] and len(forked.seqs) == 2
    sched.finish(queued)
    assert not sched.waiting and queued.finished
    sched.finish(forked)
    assert sched.running == [other]
    sched.finish(other)
    assert_all_blocks_free(sched)


def test_mixed_workload_under_pressure_ends_with_every_block_free():
    sched = make_scheduler(num_blocks=12, max_num_batched_tokens=20, max_num_seqs=4)
    reqs = [
        make_request(f"r{i}", range(37 * i, 37 * i + length), max_tokens=tokens, n=n)
        for i, (length, tokens, n) in enumerate(
            [(9, 6, 1), (14, 5, 2), (5, 8, 1), (22, 4, 1), (9, 6, 3), (3, 9, 1), (17, 3, 1)]
        )
    ]
    for r in reqs:
        sched.add(r)
    run_to_completion(sched)
    assert sched.num_preemptions > 0
    for r in reqs:
        assert r.finished and r.error is None
        assert all(len(s.output_token_ids) == r.params.max_tokens for s in r.seqs)
        assert len(r.seqs) == r.params.n
    assert_all_blocks_free(sched)


def test_unforked_request_counts_its_samples_when_admitted():
    # Before its prompt is computed an n = 3 request has one sequence, but it will run three.
    sched = make_scheduler(max_num_seqs=3)
    first = make_request("first", range(4))
    wide = make_request("wide", range(10, 16), n=3)
    sched.add(first)
    sched.add(wide)
    out = sched.schedule()
    assert set(planned(out)) == {"first"} and list(sched.waiting) == [wide]
    run_to_completion(sched)
    assert first.finished and wide.finished and len(wide.seqs) == 3
    assert_all_blocks_free(sched)


def test_a_lookup_given_back_for_lack_of_blocks_counts_once():
    sched = make_scheduler(num_blocks=4)
    big = make_request("big", range(12), max_tokens=2)
    sched.add(big)
    apply_step(sched, sched.schedule())  # 3 blocks held
    late = make_request("late", range(50, 62), max_tokens=2)
    sched.add(late)
    for _ in range(2):  # no room: its lookup is given back each step
        apply_step(sched, sched.schedule())
    run_to_completion(sched)
    assert sched.kv.prefix_queries == 24  # 12 tokens each, however often "late" was tried
    assert_all_blocks_free(sched)


def _update_one(sched: Scheduler, params: SamplingParams, tokens: list[int]) -> Sequence:
    """Feed `tokens` to one admitted sequence through `Scheduler.update`, stopping once it ended."""
    request = Request("r", [1, 2, 3], params, [Sequence([1, 2, 3], 3)])
    sched.add(request)
    sched.record_computed(sched.schedule().scheduled)
    seq = request.seqs[0]
    for token in tokens:
        if seq.finished:
            break
        sched.update([SampledToken(request, seq, token, -0.5, [] if params.logprobs is not None else None)])
    return seq


@pytest.mark.parametrize(
    ("params", "tokens", "output", "reason", "stop_reason"),
    [
        (SamplingParams(max_tokens=9), [7, 99, 8], [7, 99], "stop", None),  # EOS (99)
        (SamplingParams(max_tokens=9, ignore_eos=True), [7, 99, 8], [7, 99, 8], None, None),
        (SamplingParams(max_tokens=9, stop_token_ids=[8]), [7, 8, 9], [7, 8], "stop", 8),
        (SamplingParams(max_tokens=9, min_tokens=3), [99, 7, 99, 5], [99, 7, 99], "stop", None),
        (
            SamplingParams(max_tokens=9, stop_token_sequences=[[5, 6]]),
            [5, 7, 5, 6, 1],
            [5, 7, 5, 6],
            "stop",
            None,
        ),
        (SamplingParams(max_tokens=2), [7, 8, 9], [7, 8], "length", None),
    ],
)
def test_update_appends_tokens_and_applies_stop_conditions(params, tokens, output, reason, stop_reason):
    sched = Scheduler(SchedulerConfig(max_model_len=64), KVCacheManager(16, BS), eos_token_ids=[99])
    seq = _update_one(sched, params, tokens)
    assert (seq.output_token_ids, seq.finish_reason, seq.stop_reason) == (output, reason, stop_reason)
    if reason is not None:
        assert not seq.block_ids and sched.kv.num_free_blocks == 16  # an ended sequence's blocks are back


def test_update_ends_a_sequence_at_the_context_length_and_keeps_logprobs():
    sched = Scheduler(SchedulerConfig(max_model_len=5), KVCacheManager(16, BS), eos_token_ids=[99])
    seq = _update_one(sched, SamplingParams(max_tokens=None, logprobs=0), [7, 8, 9])
    assert seq.output_token_ids == [7, 8] and seq.finish_reason == "length"
    assert seq.cumulative_logprob == -1.0 and [lp.token_id for lp in seq.logprobs] == [7, 8]
