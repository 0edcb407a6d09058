"""Beam search over the paged cache (FasterTransformer's `beam_width`, Hugging Face's `num_beams`).

Each step takes the log-probabilities of every live beam and its scores (the log-probabilities after
the request's logits processors: bans, biases and penalties, applied per beam on its own history as
Hugging Face applies its processors to the log-softmax), keeps the best `2 * beam_width` (more with
several end tokens) continuations by cumulative score, moves those that end among the top `beam_width`
into the finished set (scored by cumulative score / generated_length ** length_penalty), and continues
with the best `beam_width` that did not end. It stops when no live beam can still beat the worst
finished one, with the same early-stopping rule as Hugging Face's default (`early_stopping=False`).

Every candidate also carries the log-probability of its token under the unprocessed distribution, the
quantity sampled sequences report, so a beam's token log-probs add up to its `cumulative_logprob`.
Candidates whose score is -inf (a banned token) are never kept.

`BeamSearch` applies one such step to a request's sequences: it forks the beams that continue (sharing
their blocks), frees the ones dropped, and at the end keeps the best `n` finished beams as the outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptserve.engine.kv_cache_manager import KVCacheManager
from gptserve.engine.scheduler import Scheduler, ends_with
from gptserve.engine.sequence import Request, Sequence
from gptserve.layers.sampler import Sampler, SamplingRow
from gptserve.outputs import TokenLogprob


@dataclass
class Candidate:
    parent: int  # index of the live beam it extends
    token_id: int
    score: float  # cumulative processed score including this token (what beams are ranked by)
    token_logprob: float  # log-prob of the token under the step's raw log-softmax


@dataclass
class BeamState:
    """Per-request beam bookkeeping; scores of the live beams live on their sequences."""

    width: int
    length_penalty: float
    best_finished: list[float] = field(default_factory=list)  # normalised scores kept so far (<= width)
    done: bool = False


@dataclass
class BeamStep:
    """What the engine must do with the live beams after one step."""

    continuing: list[Candidate]
    finishing: list[tuple[Candidate, float]]  # with normalised score


def beam_step(
    state: BeamState,
    logprobs: torch.Tensor,
    scores: torch.Tensor,
    beam_scores: list[float],
    num_generated: int,
    end_ids: set[int],
    at_length_limit: bool,
    end_pairs: set[tuple[int, int]] | None = None,
) -> BeamStep:
    """Advance a beam group by one token.

    logprobs: [live_beams, vocab] float32 log-softmax of the step's logits; scores: the same after the
    logits processors (may be `logprobs` itself); beam_scores: cumulative score of each live beam;
    num_generated: tokens each beam has generated so far; end_ids: tokens that end any beam;
    end_pairs: (beam, token) continuations that end that beam only (a stop token sequence it completes);
    at_length_limit: the new token is the last one allowed (max_tokens or the model length).
    """
    width = state.width
    end_pairs = end_pairs or set()
    total = scores + torch.tensor(beam_scores, dtype=scores.dtype, device=scores.device)[:, None]
    vocab = scores.shape[-1]
    # Enough candidates that `width` of them continue even if every beam's best tokens all end it.
    per_beam_ends: dict[int, set[int]] = {}
    for parent, token in end_pairs:
        if token not in end_ids:
            per_beam_ends.setdefault(parent, set()).add(token)
    num_ends = len(end_ids) + max((len(t) for t in per_beam_ends.values()), default=0)
    k = min(max(2, 1 + num_ends) * width, total.numel())
    top_scores, top_idx = torch.topk(total.flatten(), k)
    new_len = num_generated + 1
    norm = float(new_len) ** state.length_penalty

    continuing: list[Candidate] = []
    finishing: list[tuple[Candidate, float]] = []
    for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
        if score == -math.inf:
            break
        parent, token = divmod(idx, vocab)
        cand = Candidate(parent, token, score, logprobs[parent, token].item())
        ends = at_length_limit or token in end_ids or (parent, token) in end_pairs
        if ends:
            if rank < width and not state.done:
                finishing.append((cand, score / norm))
        elif len(continuing) < width:
            continuing.append(cand)

    for _, normalised in finishing:
        state.best_finished.append(normalised)
    state.best_finished = sorted(state.best_finished, reverse=True)[:width]

    if at_length_limit or not continuing:
        state.done = True
    elif len(state.best_finished) == width:
        best_possible = continuing[0].score / (float(new_len) ** state.length_penalty)
        if best_possible <= state.best_finished[-1]:
            state.done = True
    return BeamStep(continuing, finishing)


class BeamSearch:
    """Advances beam-search requests by one step each over the scheduler's sequences and blocks."""

    def __init__(
        self,
        scheduler: Scheduler,
        sampler: Sampler,
        sampling_row: Callable[[Request, Sequence], SamplingRow],
    ):
        self.scheduler = scheduler
        self.kv: KVCacheManager = scheduler.kv
        self.sampler = sampler
        self.sampling_row = sampling_row  # the engine's logits processors for one beam

    def step(self, request: Request, logits: torch.Tensor, beams: list[Sequence]) -> int:
        """One step of `request` given the logits of its live `beams`; returns the tokens generated."""
        params = request.params
        if request.beam_state is None:
            request.beam_state = BeamState(params.beam_width, params.length_penalty)
        state: BeamState = request.beam_state
        eos_ids = self.scheduler.eos_token_ids
        num_generated = beams[0].num_output_tokens
        at_limit = self.scheduler.ends_with_next_token(request, beams[0])
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        end_pairs: set[tuple[int, int]] = set()
        if num_generated + 1 >= params.min_tokens:
            for i, seq in enumerate(beams):
                output = seq.output_token_ids
                for stop in params.stop_token_sequences:
                    if ends_with(output, stop[:-1]):
                        end_pairs.add((i, stop[-1]))
        # The sampler's logits processors, per beam on its own history, applied to the log-softmax.
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = self.sampler.process_logits(logprobs, [self.sampling_row(request, seq) for seq in beams])
        step = beam_step(
            state,
            logprobs,
            scores,
            [b.beam_score for b in beams],
            num_generated,
            end_ids,
            at_limit,
            end_pairs,
        )
        top = _top_logprobs(params.logprobs, logprobs)

        for cand, normalised in step.finishing:
            parent = beams[cand.parent]
            done = Sequence(parent.token_ids + [cand.token_id], parent.num_prompt_tokens)
            done.logprobs = parent.logprobs + [
                TokenLogprob(cand.token_id, cand.token_logprob, top[cand.parent])
            ]
            done.cumulative_logprob = parent.cumulative_logprob + cand.token_logprob
            if cand.token_id in end_ids or (cand.parent, cand.token_id) in end_pairs:
                done.finish_reason = "stop"
                eos = not params.ignore_eos and cand.token_id in eos_ids
                if not eos and cand.token_id in params.stop_token_ids:
                    done.stop_reason = cand.token_id
            else:
                done.finish_reason = "length"
            done.beam_score = normalised
            request.finished_beams.append(done)
        request.finished_beams.sort(key=lambda s: s.beam_score, reverse=True)
        del request.finished_beams[state.width :]

        if state.done:
            for seq in beams:
                self.kv.free(seq)
                seq.finish_reason = "stop"
            self._finish(request)
            return 0
        # The first continuation of a beam keeps its sequence; further ones fork it (sharing blocks).
        used: set[int] = set()
        new_beams: list[Sequence] = []
        for cand in step.continuing:
            parent = beams[cand.parent]
            if cand.parent in used:
                seq = parent.fork(len(new_beams), None)
                self.kv.share(seq)
            else:
                used.add(cand.parent)
                seq = parent
            new_beams.append(seq)
        for seq, cand in zip(new_beams, step.continuing):
            seq.token_ids.append(cand.token_id)
            seq.beam_score = cand.score
            seq.cumulative_logprob += cand.token_logprob
            seq.logprobs.append(TokenLogprob(cand.token_id, cand.token_logprob, top[cand.parent]))
        for i, seq in enumerate(beams):
            if i not in used:
                self.kv.free(seq)
        request.seqs = new_beams
        return len(new_beams)

    def _finish(self, request: Request) -> None:
        """The search ended: the best `n` finished beams become the request's outputs."""
        best = request.finished_beams[: request.params.n]
        for i, seq in enumerate(best):
            seq.index = i
        request.seqs = best
        request.finished_beams = []
        self.scheduler.finish(request)


def _top_logprobs(num: int | None, logprobs: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per live beam, its `num` most likely (id, raw log-prob) pairs (empty if not asked)."""
    k = min(num or 0, logprobs.shape[-1])
    if k == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
    return [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
