"""Beam search over the paged cache (FasterTransformer's `beam_width`, Hugging Face's `num_beams`).

Each step takes the log-probabilities of every live beam, keeps the best `2 * beam_width` (more with
several end tokens) continuations, moves those that end among the top `beam_width` into the finished
set (scored by sum of log-probs / generated_length ** length_penalty), and continues with the best
`beam_width` that did not end. It stops when no live beam can still beat the worst finished one,
with the same early-stopping rule as Hugging Face's default (`early_stopping=False`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Candidate:
    parent: int  # index of the live beam it extends
    token_id: int
    score: float  # cumulative log-prob including this token
    token_logprob: float


@dataclass
class BeamState:
    """Per-request beam bookkeeping; scores of the live beams live on their sequences."""

    width: int
    length_penalty: float
    finished: list[tuple[float, int, int]] = field(default_factory=list)  # (score, parent, token) this step
    best_finished: list[float] = field(default_factory=list)  # normalised scores kept so far (<= width)
    done: bool = False


@dataclass
class BeamStep:
    """What the engine must do with the live beams after one step."""

    continuing: list[Candidate]
    finishing: list[tuple[Candidate, float]]  # with normalised score


def beam_step(
    state: BeamState,
    logits: torch.Tensor,
    beam_scores: list[float],
    num_generated: int,
    end_ids: set[int],
    at_length_limit: bool,
) -> BeamStep:
    """Advance a beam group by one token.

    logits: [live_beams, vocab] float32; beam_scores: cumulative log-prob of each live beam;
    num_generated: tokens each beam has generated so far; at_length_limit: the new token is the
    last one allowed (max_tokens or the model length).
    """
    width = state.width
    logprobs = torch.log_softmax(logits, dim=-1)
    total = logprobs + torch.tensor(beam_scores, dtype=logprobs.dtype)[:, None]
    vocab = logprobs.shape[-1]
    k = min(max(2, 1 + len(end_ids)) * width, total.numel())
    top_scores, top_idx = torch.topk(total.flatten(), k)
    new_len = num_generated + 1
    norm = float(new_len) ** state.length_penalty

    continuing: list[Candidate] = []
    finishing: list[tuple[Candidate, float]] = []
    for rank, (score, idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
        parent, token = divmod(idx, vocab)
        cand = Candidate(parent, token, score, logprobs[parent, token].item())
        ends = at_length_limit or token in end_ids
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
