"""`IncrementalDetokenizer`: turns the token ids of one sequence, as they are generated, into text deltas.

Each step decodes only a short window of recent tokens and returns the text that window added, so the cost
per token does not grow with the length of the output. Text is held back while it ends in an incomplete
UTF-8 character, so no delta ever carries half of one.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

# Number of prompt tokens decoded in front of the first output tokens. SentencePiece-style decoders drop
# the leading space of whichever token starts a decode, so an output token must never be first in a window.
PROMPT_CONTEXT_TOKENS = 5

# What byte-level and byte-fallback decoders produce for bytes that are not (yet) a whole character.
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Streaming decoder of one sequence's output tokens.

    The window is `ids[prefix_offset:]`; the text of `ids[prefix_offset:read_offset]` has already been
    emitted (or is prompt context), and `read_offset` always sits on a character boundary. A step decodes
    the window and emits what lies beyond the already-emitted text, unless the window ends in U+FFFD: that
    may be a character whose remaining bytes are still to come, so the step emits nothing and waits.

    For byte-level BPE tokenizers the joined deltas plus `flush()` equal
    `tokenizer.decode(output_ids, skip_special_tokens=...)`. After `flush()` the sequence is finished.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._num_context = len(self._ids)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._chunks: list[str] = []
        self._text: str | None = ""
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far (the joined deltas)."""
        if self._text is None:
            self._text = "".join(self._chunks)
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append newly generated tokens and return the text they complete (possibly empty)."""
        if self._finished:
            raise RuntimeError("add_tokens() called after flush(): the sequence is already finished")
        if not new_token_ids:
            return ""
        self._ids.extend(new_token_ids)
        return self._step(final=False)

    def flush(self) -> str:
        """End the stream: return any held-back text, with incomplete byte sequences shown as U+FFFD."""
        if self._finished:
            return ""
        delta = self._step(final=True)
        self._finished = True
        return delta

    def _step(self, final: bool) -> str:
        end = len(self._ids)
        text = self._decode(self._prefix_offset, end)
        if not final and text.endswith(REPLACEMENT_CHAR):
            # Byte-fallback decoders show each pending byte as its own U+FFFD, so everything past the last
            # boundary waits, not only the final character.
            return ""
        delta = text[len(self._prefix_text) :]
        if delta:
            # Slide the window: the tokens just emitted become the context of the next step.
            self._prefix_offset = self._read_offset
            self._read_offset = end
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
            self._chunks.append(delta)
            self._text = None
        else:
            # Tokens with no text (skipped special tokens) extend the window instead of replacing its
            # context, so the next real token still has a token in front of it.
            self._read_offset = end
            self._prefix_text = text
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._decode_ids(self._ids[start:end])

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        # A prompt cut inside a multi-byte character would let the first output bytes complete it, and that
        # character belongs to neither text; drop context tokens until the context ends on a boundary.
        context = list(prompt_token_ids[max(len(prompt_token_ids) - PROMPT_CONTEXT_TOKENS, 0) :])
        while context and self._decode_ids(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        return context

    def _decode_ids(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )
