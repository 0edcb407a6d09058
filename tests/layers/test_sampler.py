"""Tests of the batched sampler: each stage against Hugging Face's logits processors or a direct formula,
greedy and draw behaviour, seeded reproducibility across batches, and raw log-probs."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gptserve.layers import logits_processors as lp
from gptserve.layers.sampler import Sampler, SamplingRow, make_generator, row_argmax
from gptserve.sampling_params import SamplingParams

VOCAB = 512


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def make_row(
    params: SamplingParams,
    *,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    forbidden: tuple[int, ...] = (),
) -> SamplingRow:
    generator = None if params.greedy else make_generator(params.seed)
    return SamplingRow(params, generator, list(prompt or []), list(output or []), forbidden)


def hf(processor, scores: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    ids = torch.tensor([input_ids or [0]], dtype=torch.long)
    return processor(ids, scores.clone())


def test_greedy_is_argmax_and_input_untouched() -> None:
    logits = random_logits(8)
    before = logits.clone()
    rows = [
        make_row(SamplingParams(temperature=0.0, repetition_penalty=1.3), output=[1, 2]) for _ in range(8)
    ]
    rows[0] = make_row(SamplingParams(temperature=0.0))
    out = Sampler()(logits, rows)
    assert torch.equal(logits, before)
    assert out.token_ids[0] == int(logits[0].argmax())
    processed = Sampler().process_logits(logits, rows)
    assert out.token_ids == processed.argmax(-1).tolist()


def test_top_k_matches_hf() -> None:
    logits = random_logits(5)
    ks = [1, 3, 40, 200, VOCAB]
    got = lp.apply_top_k(logits, torch.tensor(ks), max(ks))
    got_sorted = lp.apply_top_k_top_p(logits, torch.tensor(ks), torch.ones(5), num_candidates=VOCAB)
    for i, k in enumerate(ks):
        want = hf(TopKLogitsWarper(k), logits[i : i + 1])[0]
        assert torch.equal(got[i], want)
        assert torch.equal(got_sorted[i], want)


@pytest.mark.parametrize("num_candidates", [4, 32, VOCAB])
def test_top_p_and_top_k_top_p_match_hf(num_candidates: int) -> None:
    # Few candidates force the widening passes (4 -> 64 -> vocab); VOCAB sorts at once.
    logits = random_logits(6)
    ps = [0.05, 0.3, 0.7, 0.95, 1.0, 0.999]
    ks = [VOCAB, 10, 100, 3, 50, VOCAB]
    got_p = lp.apply_top_k_top_p(logits, None, torch.tensor(ps), num_candidates)
    got_kp = lp.apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps), max(num_candidates, *ks))
    for i, (p, k) in enumerate(zip(ps, ks, strict=True)):
        row = logits[i : i + 1]
        want_p = row[0] if p == 1.0 else hf(TopPLogitsWarper(p), row)[0]
        assert torch.equal(got_p[i], want_p)
        want_kp = hf(TopKLogitsWarper(k), row)
        if p < 1.0:
            want_kp = hf(TopPLogitsWarper(p), want_kp)
        assert torch.equal(got_kp[i], want_kp[0])


def test_min_p_matches_hf() -> None:
    logits = random_logits(4)
    min_ps = [0.01, 0.1, 0.5, 1.0]
    got = lp.apply_min_p(logits, torch.tensor(min_ps).log())
    for i, m in enumerate(min_ps):
        want = hf(MinPLogitsWarper(m), logits[i : i + 1])[0]
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want))
        torch.testing.assert_close(got[i], want)


def test_repetition_penalty_and_bad_words_match_hf() -> None:
    logits = random_logits(3)
    prompts = [[5, 6, 7, 5], [100, 200], []]
    outputs = [[7, 8, 9], [300, 200, 1, 2], [4, 4, 4, 11]]
    bad_words = [[3], [8, 9, 10], [200, 1, 2, 77], [2, 99], [11, 12]]
    penalties = [1.3, 0.8, 2.0]
    rows = [
        make_row(
            SamplingParams(temperature=0.0, repetition_penalty=pen, bad_words_ids=bad_words),
            prompt=p,
            output=o,
        )
        for pen, p, o in zip(penalties, prompts, outputs, strict=True)
    ]
    got = Sampler().process_logits(logits, rows)
    for i, (pen, p, o) in enumerate(zip(penalties, prompts, outputs, strict=True)):
        want = hf(RepetitionPenaltyLogitsProcessor(pen), logits[i : i + 1], p + o)
        # Every multi-token bad word is checked against the output alone, so compare with HF on it.
        want = hf(NoBadWordsLogitsProcessor(bad_words), want, o)
        assert torch.equal(got[i], want[0])
    assert torch.isinf(got[0, 10]) and torch.isinf(got[1, 77]) and torch.isinf(got[1, 99])
    assert torch.isinf(got[2, 12]) and not torch.isinf(got[0, 12]) and not torch.isinf(got[0, 77])


def test_bad_word_bans_need_the_prefix_in_the_output() -> None:
    assert lp.bad_word_bans([[5], [1, 2, 3]], [9, 1, 2]) == [5, 3]
    assert lp.bad_word_bans([[1, 2, 3]], [2]) == []
    assert lp.bad_word_bans([[1, 2, 3]], [1, 2, 4]) == []


def test_frequency_and_presence_penalties_follow_the_openai_formula() -> None:
    logits = random_logits(3)
    outputs = [[3, 3, 3, 7, 9], [], [VOCAB - 1, 0, 0]]
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.0, frequency_penalty=-0.7, presence_penalty=-2.0),
    ]
    rows = [make_row(p, prompt=[3, 4, 5], output=o) for p, o in zip(params, outputs, strict=True)]
    got = Sampler().process_logits(logits, rows)
    for i, (p, o) in enumerate(zip(params, outputs, strict=True)):
        count = torch.bincount(torch.tensor(o, dtype=torch.long), minlength=VOCAB).float()
        want = logits[i] - p.frequency_penalty * count - p.presence_penalty * (count > 0).float()
        torch.testing.assert_close(got[i], want)


def test_logit_bias_and_forbidden_ids() -> None:
    logits = random_logits(2)
    bias = {5: 100.0, 17: -3.5, 300: 0.25}
    rows = [
        make_row(SamplingParams(temperature=0.0, logit_bias=bias)),
        make_row(SamplingParams(temperature=0.0)),
    ]
    got = Sampler().process_logits(logits, rows)
    want = logits[0].clone()
    for token, value in bias.items():
        want[token] += value
    assert torch.equal(got[0], want) and torch.equal(got[1], logits[1])
    assert Sampler()(logits, rows).token_ids[0] == 5

    # Forbid the 50 likeliest tokens; hot sampling must still never reach them, nor greedy.
    forbidden = tuple(logits[1].topk(50).indices.tolist())
    many = [make_row(SamplingParams(temperature=3.0, seed=s), forbidden=forbidden) for s in range(64)]
    many.append(make_row(SamplingParams(temperature=0.0), forbidden=forbidden))
    out = Sampler()(logits[1:].expand(len(many), -1), many)
    assert not set(out.token_ids) & set(forbidden)
    assert out.token_ids[-1] == int(logits[1].topk(51).indices[-1])


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(6)
    rows = [make_row(SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(6)]
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()
    single = lp.apply_top_k(logits, torch.ones(6, dtype=torch.long), 1)
    assert torch.equal(torch.isfinite(single).sum(-1), torch.ones(6, dtype=torch.long))


def mixed_params(seed: int) -> list[SamplingParams]:
    """A batch-mate for every stage: greedy, penalties, truncations, bad words, logprobs."""
    return [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, seed=seed + 1),
        SamplingParams(temperature=1.2, top_k=20, seed=seed + 2),
        SamplingParams(temperature=0.9, top_p=0.8, seed=seed + 3, logprobs=3),
        SamplingParams(temperature=1.0, min_p=0.1, seed=seed + 4),
        SamplingParams(temperature=0.5, top_k=50, top_p=0.9, min_p=0.05, seed=seed + 5),
        SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=seed + 6),
        SamplingParams(temperature=0.8, frequency_penalty=1.0, presence_penalty=0.5),
        SamplingParams(temperature=0.0, logit_bias={3: 5.0}, logprobs=0),
        SamplingParams(temperature=1.1, bad_words_ids=[[4], [1, 2]], seed=seed + 9),
        SamplingParams(temperature=2.0, top_k=5, seed=seed + 10),
        SamplingParams(temperature=0.3, top_p=0.5, seed=seed + 11),
        SamplingParams(temperature=0.0, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, seed=seed + 13),
        SamplingParams(temperature=0.6, min_p=0.3, top_k=100, seed=seed + 14),
    ]


def test_seeded_row_is_batch_independent() -> None:
    target = SamplingParams(temperature=0.9, top_p=0.9, frequency_penalty=0.4, seed=1234)
    steps = 6
    step_logits = [random_logits(16, seed=100 + t, scale=1.0) for t in range(steps)]
    sampler = Sampler()

    alone = make_row(target, prompt=[1, 2, 3])
    for t in range(steps):
        alone.output_token_ids.append(sampler(step_logits[t][7:8], [alone]).token_ids[0])

    batch = [make_row(p, prompt=[1, 2, 3]) for p in mixed_params(seed=0)]
    batch.insert(7, make_row(target, prompt=[1, 2, 3]))
    assert len(batch) == 16
    for t in range(steps):
        for row, token in zip(batch, sampler(step_logits[t], batch).token_ids, strict=True):
            row.output_token_ids.append(token)
    assert batch[7].output_token_ids == alone.output_token_ids


def test_draw_is_the_exponential_race_over_hf_warped_logits() -> None:
    logits = random_logits(15, seed=3)
    params = mixed_params(seed=50)
    rows = [make_row(p, prompt=[9], output=[1, 2, 5, 5]) for p in params]
    sampler = Sampler()
    processed = sampler.process_logits(logits, rows)
    tokens = sampler(logits, rows).token_ids
    for i, p in enumerate(params):
        if p.greedy:
            assert tokens[i] == int(processed[i].argmax())
            continue
        scores = hf(TemperatureLogitsWarper(p.temperature), processed[i : i + 1])
        if p.top_k:
            scores = hf(TopKLogitsWarper(p.top_k), scores)
        if p.top_p < 1.0:
            scores = hf(TopPLogitsWarper(p.top_p), scores)
        if p.min_p:
            scores = hf(MinPLogitsWarper(p.min_p), scores)
        if p.seed is None:
            assert torch.isfinite(scores[0, tokens[i]])
            continue
        # Exponential noise E = -log U from the row's own seeded stream.
        exponential = -torch.empty(VOCAB).uniform_(generator=make_generator(p.seed)).log()
        assert tokens[i] == int((scores[0] - exponential.log()).argmax())


def test_different_seeds_give_different_draws() -> None:
    sampler = Sampler()
    sequences = []
    for seed in (1, 2):
        row = make_row(SamplingParams(temperature=1.0, seed=seed))
        sequences.append([sampler(random_logits(1, seed=t, scale=0.5), [row]).token_ids[0] for t in range(4)])
    assert sequences[0] != sequences[1]
    assert make_generator(None).initial_seed() != make_generator(None).initial_seed()


def test_empirical_distribution_matches_softmax() -> None:
    temperature, draws = 0.7, 4000
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, 2.0, -3.0]])
    rows = [make_row(SamplingParams(temperature=temperature, seed=10_000 + s)) for s in range(draws)]
    tokens = Sampler()(logits.expand(draws, -1), rows).token_ids
    observed = torch.bincount(torch.tensor(tokens), minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=-1) * draws
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    # Five degrees of freedom: 30 is far in the tail (p < 1e-4), and the seeds are fixed.
    assert chi_square < 30.0, (observed, expected)


@pytest.mark.parametrize(
    ("params", "allowed_by"),
    [
        (SamplingParams(temperature=1.0, top_p=0.6), TopPLogitsWarper(0.6)),
        (SamplingParams(temperature=1.0, min_p=0.2), MinPLogitsWarper(0.2)),
    ],
)
def test_truncation_never_picks_outside_the_allowed_set(params: SamplingParams, allowed_by) -> None:
    logits = random_logits(1, seed=7, scale=1.5)
    allowed = set(torch.isfinite(hf(allowed_by, logits))[0].nonzero().flatten().tolist())
    rows = []
    for s in range(300):
        rows.append(make_row(SamplingParams(temperature=1.0, top_p=params.top_p, min_p=params.min_p, seed=s)))
    tokens = set(Sampler()(logits.expand(len(rows), -1), rows).token_ids)
    assert tokens <= allowed and len(tokens) > 1


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(5, seed=11)
    asked = [None, 0, 3, 5, 20]
    rows = [
        make_row(
            SamplingParams(temperature=0.8, logprobs=k, seed=i, repetition_penalty=1.5, logit_bias={2: 9.0}),
            output=[2],
        )
        for i, k in enumerate(asked)
    ]
    out = Sampler()(logits, rows)
    log_probs = torch.log_softmax(logits, dim=-1)
    top = log_probs.topk(20, dim=-1)
    for i, k in enumerate(asked):
        token = out.token_ids[i]
        if k is None:
            assert out.top_logprobs[i] is None
            assert out.logprobs[i] == pytest.approx(float(log_probs[i, token]), abs=1e-5)
            continue
        assert out.logprobs[i] == float(log_probs[i, token])
        assert out.top_logprobs[i] == list(
            zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist(), strict=True)
        )


def test_empty_batch_and_shape_mismatch() -> None:
    out = Sampler()(torch.empty(0, VOCAB), [])
    assert out.token_ids == [] and out.logprobs == [] and out.top_logprobs == []
    with pytest.raises(ValueError):
        Sampler()(random_logits(2), [make_row(SamplingParams(temperature=0.0))])


@pytest.mark.parametrize("vocab", [49152, 8192, 50257, VOCAB])
def test_row_argmax_is_argmax(vocab: int) -> None:
    x = random_logits(6, vocab, seed=5)
    x[1, [100, vocab - 3]] = x[1].max() + 1  # a tie across blocks: the first index wins
    x[2] = 0.0  # all equal
    x[3, vocab // 2] = float("inf")
    x[4, [vocab - 1, 300]] = float("nan")  # NaN counts as the largest value, as in torch.argmax
    x[5, -1] = x[5].max() + 1  # last entry of the last block
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    assert torch.equal(row_argmax(x[:1]), x[:1].argmax(dim=-1))
