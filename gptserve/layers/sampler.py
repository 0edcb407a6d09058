"""Next-token selection for a batch in which every row carries its own `SamplingParams`.

The sampler owns the order of the stages (the same as vLLM and Hugging Face, so results can be compared
with them): grammar masks (the tokens a structured-output row may take), logit bias and bad words,
engine-forbidden ids, repetition penalty, frequency and presence penalties; then greedy rows take the
argmax and sampling rows go through temperature, top-k, top-p, min-p and a draw. Each stage runs only
on the rows that use it and is skipped when none does, so an all-greedy or plain-temperature batch
costs little more than an argmax or one noise draw per row.

Draws use the exponential race: `argmax(probs / E)` with `E ~ Exponential(1)` drawn over the full
vocabulary from the row's own generator, computed as `argmax(logits / T - log E)`. A seeded row therefore
picks the same tokens whatever else shares its batch. Reported log-probs are those of the raw logits.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from gptserve.layers import logits_processors as lp
from gptserve.sampling_params import SamplingParams

# Dividing by a smaller temperature could overflow float32 logits; at 1e-5 the draw is already greedy.
_MIN_TEMPERATURE = 1e-5
# Best logits per row in which the top-p nucleus is sought first on CPU (see `apply_top_k_top_p`).
_TOP_P_CANDIDATES = 256
# Width of the blocks `row_argmax` reduces first.
_ARGMAX_BLOCK = 1024


@dataclass
class SamplingRow:
    """One row of the logits: a sequence that needs its next token."""

    params: SamplingParams
    # Per-request RNG, on the logits' device for speed; None for greedy rows (a sampling row without one
    # draws from torch's global RNG and loses batch independence).
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    forbidden_token_ids: Sequence[int] = ()  # e.g. EOS and stop ids while the output is below min_tokens


@dataclass
class TokenBitmask:
    """Allowed tokens of some rows (a grammar's): `bits[i]` (int32, bit `t % 32` of word `t // 32` set when
    token t is allowed) belongs to row `rows[i]`. Built on the host; the sampler moves it to the logits."""

    rows: list[int]
    bits: torch.Tensor


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[float]  # log-prob of each chosen token under the raw (unprocessed) distribution
    # the `params.logprobs` best (id, raw log-prob) pairs; None where the row did not ask
    top_logprobs: list[list[tuple[int, float]] | None]


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: seeded from `seed`, or from OS entropy when it is None."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    return generator


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host-built batch tensor to `device` without making the host wait for queued GPU work."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        # Only a copy from pinned memory is truly asynchronous; PyTorch's pinned-block cache keeps the
        # buffer alive until the copy has run.
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=torch.long), device)


def _float(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=torch.float32), device)


def _flat_occurrences(
    row_ids: list[int], seqs: list[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten token sequences into parallel (row, token) index tensors; `seqs[i]` belongs to `row_ids[i]`."""
    lengths = [len(s) for s in seqs]
    # Built with numpy on the host: several times faster than torch.tensor on long lists of ints.
    tokens = np.fromiter(chain.from_iterable(seqs), dtype=np.int64, count=sum(lengths))
    rows = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)
    return _to_device(torch.from_numpy(rows), device), _to_device(torch.from_numpy(tokens), device)


# Row subsets are taken with `x[index]` rather than `index_select`, which is far slower on CPU for wide rows.
def _on_rows(x: torch.Tensor, rows: list[int], stage: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply `stage` to the listed rows of `x` (a tensor the sampler owns, updated in place) and return it."""
    if len(rows) == x.shape[0]:
        return stage(x)
    index = _long(rows, x.device)
    x.index_copy_(0, index, stage(x[index]))
    return x


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(dim=-1)` of a [rows, vocab] tensor: the first index of each row's maximum.

    On CPU argmax is a scalar loop (about 40 us per 50k-entry row) while amax is vectorised, so a
    vocabulary that splits into whole blocks is reduced block-wise first: the first block holding the
    row's maximum, then the first maximum inside it. That is the same index, NaN included (both
    reductions treat NaN as the largest value), in about half the time for one row, an eighth for 16.
    """
    rows, vocab = x.shape
    if x.device.type != "cpu" or vocab % _ARGMAX_BLOCK or vocab < 4 * _ARGMAX_BLOCK or not x.is_contiguous():
        return x.argmax(dim=-1)
    blocks = x.view(rows, vocab // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)
    inside = blocks[torch.arange(rows, device=x.device), best].argmax(dim=-1)
    return best * _ARGMAX_BLOCK + inside


class Sampler:
    """Picks one token per row of a [rows, vocab] float32 logits tensor. The input is never modified."""

    def __call__(
        self,
        logits: torch.Tensor,
        rows: list[SamplingRow],
        before_fetch: Callable[[torch.Tensor], None] | None = None,
        allowed: TokenBitmask | None = None,
    ) -> SamplerOutput:
        """One token per row. `before_fetch` is handed the chosen tokens on the logits' device before
        they are copied to the host (the engine launches its next step from them); `allowed` limits
        some rows to the tokens their grammar allows."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(rows)} sampling rows")
        if not rows:
            return SamplerOutput([], [], [])
        raw = logits.float()
        processed = self.process_logits(raw, rows, allowed)
        greedy = [i for i, row in enumerate(rows) if row.params.greedy]
        if len(greedy) == len(rows):
            tokens = row_argmax(processed)
        else:
            sampling = [i for i, row in enumerate(rows) if not row.params.greedy]
            sampling_rows = [rows[i] for i in sampling]
            processed_sampling = processed[_long(sampling, raw.device)] if greedy else processed
            drawn = self._draw(self.warp_logits(processed_sampling, sampling_rows), sampling_rows)
            if greedy:
                tokens = row_argmax(processed)
                tokens.index_copy_(0, _long(sampling, raw.device), drawn)
            else:
                tokens = drawn
        return self._with_logprobs(raw, tokens, rows, before_fetch)

    def process_logits(
        self, logits: torch.Tensor, rows: list[SamplingRow], allowed: TokenBitmask | None = None
    ) -> torch.Tensor:
        """Grammar masks, logit bias, bans and penalties, which greedy and sampling rows share.

        Returns `logits` itself when no row uses any of them, else a modified copy.
        """
        device = logits.device
        bias_rows: list[int] = []
        bias_tokens: list[int] = []
        bias_values: list[float] = []
        ban_rows: list[int] = []
        ban_tokens: list[int] = []
        repetition: list[int] = []
        frequency: list[int] = []
        for i, row in enumerate(rows):
            params = row.params
            if params.logit_bias:
                bias_rows.extend([i] * len(params.logit_bias))
                bias_tokens.extend(params.logit_bias.keys())
                bias_values.extend(params.logit_bias.values())
            banned = list(row.forbidden_token_ids)
            if params.bad_words_ids:
                banned.extend(lp.bad_word_bans(params.bad_words_ids, row.output_token_ids))
            if banned:
                ban_rows.extend([i] * len(banned))
                ban_tokens.extend(banned)
            if params.repetition_penalty != 1.0:
                repetition.append(i)
            if (params.frequency_penalty or params.presence_penalty) and row.output_token_ids:
                frequency.append(i)
        if not (bias_rows or ban_rows or repetition or frequency or allowed is not None):
            return logits

        x = logits.clone(memory_format=torch.contiguous_format)
        if allowed is not None and allowed.rows:
            bits = _to_device(allowed.bits, device)
            lp.apply_token_bitmask(x, _long(allowed.rows, device), bits)
        if bias_rows:
            bias = _float(bias_values, device)
            lp.add_logit_bias(x, _long(bias_rows, device), _long(bias_tokens, device), bias)
        if ban_rows:
            lp.ban_tokens(x, _long(ban_rows, device), _long(ban_tokens, device))
        if repetition:
            seqs = [s for i in repetition for s in (rows[i].prompt_token_ids, rows[i].output_token_ids)]
            occ_rows, occ_tokens = _flat_occurrences([i for i in repetition for _ in (0, 1)], seqs, device)
            per_row = _float([row.params.repetition_penalty for row in rows], device)
            lp.apply_repetition_penalty(x, occ_rows, occ_tokens, per_row[occ_rows])
        if frequency:
            outputs = [rows[i].output_token_ids for i in frequency]
            occ_rows, occ_tokens = _flat_occurrences(frequency, outputs, device)
            lp.apply_frequency_presence_penalties(
                x,
                occ_rows,
                occ_tokens,
                _float([row.params.frequency_penalty for row in rows], device),
                _float([row.params.presence_penalty for row in rows], device),
            )
        return x

    def warp_logits(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p and min-p for sampling rows (one per logits row), as a new tensor."""
        device = logits.device
        vocab = logits.shape[1]
        temperatures = _float([max(row.params.temperature, _MIN_TEMPERATURE) for row in rows], device)
        x = logits / temperatures.unsqueeze(-1)

        top_k = [row.params.top_k if 0 < row.params.top_k < vocab else vocab for row in rows]
        top_p = [row.params.top_p for row in rows]
        with_top_k = [j for j, k in enumerate(top_k) if k < vocab]
        with_top_p = [j for j, p in enumerate(top_p) if p < 1.0]
        if with_top_p:
            truncated = sorted(set(with_top_k) | set(with_top_p))
            ks = _long([top_k[j] for j in truncated], device) if with_top_k else None
            ps = _float([top_p[j] for j in truncated], device)
            # Partial top-k beats sorting whole rows on CPU; accelerators sort fast and would pay syncs.
            needed = max([_TOP_P_CANDIDATES] + [top_k[j] for j in with_top_k])
            candidates = needed if device.type == "cpu" else vocab
            x = _on_rows(x, truncated, lambda sub: lp.apply_top_k_top_p(sub, ks, ps, candidates))
        elif with_top_k:
            ks_list = [top_k[j] for j in with_top_k]
            ks = _long(ks_list, device)
            x = _on_rows(x, with_top_k, lambda sub: lp.apply_top_k(sub, ks, max(ks_list)))

        with_min_p = [j for j, row in enumerate(rows) if row.params.min_p > 0.0]
        if with_min_p:
            log_min_p = _float([math.log(rows[j].params.min_p) for j in with_min_p], device)
            x = _on_rows(x, with_min_p, lambda sub: lp.apply_min_p(sub, log_min_p))
        return x

    def _draw(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row of the warped logits `x` (overwritten), by the exponential race."""
        # E = -log U with U uniform is Exponential(1), and a uniform draw is several times cheaper than
        # `exponential_`. U == 0 gives E = inf, which only removes that token from this one draw, whereas
        # E == 0 would let a -inf token win. Each row's uniforms come from its own generator; the
        # transform is elementwise, so a row's noise does not depend on the rest of the batch.
        uniform = torch.empty_like(x)
        for j, row in enumerate(rows):
            generator = row.generator
            if generator is None or generator.device == x.device:
                uniform[j].uniform_(generator=generator)
            else:
                uniform[j].copy_(
                    torch.empty(x.shape[1], device=generator.device).uniform_(generator=generator)
                )
        log_noise = uniform.log_().neg_().log_()
        return row_argmax(x.sub_(log_noise))

    def _with_logprobs(
        self,
        raw: torch.Tensor,
        tokens: torch.Tensor,
        rows: list[SamplingRow],
        before_fetch: Callable[[torch.Tensor], None] | None = None,
    ) -> SamplerOutput:
        """Attach raw log-probs: of the chosen tokens for every row, and the best ones where asked."""
        device = raw.device
        asking = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        if len(asking) < len(rows):
            # log_softmax is one fused pass on CPU, faster than logsumexp's several.
            chosen = raw.log_softmax(dim=-1).gather(1, tokens.unsqueeze(-1)).squeeze(-1)
        top_values = top_ids = None
        if asking:
            index = _long(asking, device)
            log_probs = raw[index].log_softmax(dim=-1)
            chosen_asking = log_probs.gather(1, tokens[index].unsqueeze(-1)).squeeze(-1)
            chosen = chosen_asking if len(asking) == len(rows) else chosen.index_copy(0, index, chosen_asking)
            max_k = max(rows[i].params.logprobs for i in asking)
            if max_k > 0:
                top_values, top_ids = (t.tolist() for t in log_probs.topk(max_k, dim=-1))

        top_logprobs: list[list[tuple[int, float]] | None] = [None] * len(rows)
        for j, i in enumerate(asking):
            k = rows[i].params.logprobs
            top_logprobs[i] = list(zip(top_ids[j][:k], top_values[j][:k], strict=True)) if k else []
        if not tokens.is_cuda:
            if before_fetch is not None:
                before_fetch(tokens)
            return SamplerOutput(tokens.tolist(), chosen.tolist(), top_logprobs)
        # One device-to-host transfer for both (token ids are exact in float64), queued before whatever
        # `before_fetch` launches, so that waiting for it does not wait for that work too.
        both = torch.stack((tokens.double(), chosen.double()))
        if before_fetch is None:
            ids, values = both.tolist()
        else:
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            before_fetch(tokens)
            copied.synchronize()
            ids, values = host.tolist()
        return SamplerOutput([int(t) for t in ids], values, top_logprobs)
