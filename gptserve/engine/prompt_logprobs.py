"""Prompt log-probabilities: the log-probability of each prompt token (after the first) under the logits of
the position before it, with the `prompt_logprobs` most likely alternatives and the token's rank.

The model runner computes a logits row for every prompt position of a request that asked for them
(`LogitsLayout.prompt_spans`); this turns those rows into `TokenLogprob`s on the request, for the core to
report. A chunk recomputed after preemption reports only the positions not reported before.
"""

from __future__ import annotations

import torch

from gptserve.engine.scheduler import ScheduledSeq
from gptserve.engine.sequence import Request
from gptserve.engine.step_inputs import LogitsLayout
from gptserve.outputs import TokenLogprob


def score_prompts(scheduled: list[ScheduledSeq], logits: torch.Tensor, layout: LogitsLayout) -> list[Request]:
    """Add to each request's `new_prompt_logprobs` what this step's prompt rows give; returns the requests
    that gained some."""
    scored = []
    for entry, first, count in layout.prompt_spans:
        item = scheduled[entry]
        request, seq = item.request, item.seq
        if seq.finished:
            continue
        start = seq.num_computed_tokens - item.num_new_tokens  # the chunk's first position
        skip = max(request.num_prompt_logprobs - start, 0)
        if skip >= count:
            continue
        logprobs = logits[first + skip : first + count].float().log_softmax(dim=-1)
        targets = seq.token_ids[start + 1 + skip : start + 1 + count]
        index = torch.tensor(targets, device=logprobs.device)[:, None]
        chosen = logprobs.gather(1, index)
        ranks = (logprobs > chosen).sum(dim=-1).add_(1).tolist()
        k = min(request.params.prompt_logprobs or 0, logprobs.shape[-1])
        tops: list[list[tuple[int, float]]] = [[] for _ in targets]
        if k:
            values, ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
            tops = [list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)]
        new = [
            TokenLogprob(t, v, top, rank)
            for t, v, top, rank in zip(targets, chosen.squeeze(1).tolist(), tops, ranks, strict=True)
        ]
        if request.new_prompt_logprobs is None:
            request.new_prompt_logprobs = new
        else:
            request.new_prompt_logprobs += new
        request.num_prompt_logprobs = start + count
        scored.append(request)
    return scored
