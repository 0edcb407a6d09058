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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


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
