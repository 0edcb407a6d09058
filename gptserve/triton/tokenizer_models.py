"""FasterTransformer's `preprocessing` and `postprocessing` python-backend models, run natively.

They are recognised by their tensors, not their names or `model.py`: preprocessing turns `QUERY` strings
and CSV word lists (`BAD_WORDS_DICT`, `STOP_WORDS_DICT`) into `INPUT_ID` (padded with the end id, as FT's
does), `REQUEST_INPUT_LEN`, `BAD_WORDS_IDS`/`STOP_WORDS_IDS` in FT's word-list format and passes
`REQUEST_OUTPUT_LEN` through; postprocessing decodes every beam of `TOKENS_BATCH` into one string exactly
as FT's `model.py` does: the whole row, prompt and end-id padding included (`<|endoftext|>` for GPT-2's
vocabulary), as one flat array of batch x beam strings (cut at `sequence_length` where a revision that
sends it does). The tokenizer is the GPT-2 BPE of
`gpt2-vocab.json` + `gpt2-merges.txt` in the version directory, else the repository's LLM tokenizer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from gptserve.triton.ft_tensors import to_word_list
from gptserve.triton.types import (
    InferRequest,
    InferResponse,
    TritonError,
    TritonModel,
    check_request,
    make_response,
    tensor_specs,
)

GPT2_VOCAB = "gpt2-vocab.json"
GPT2_MERGES = "gpt2-merges.txt"
GPT2_END_OF_TEXT = "<|endoftext|>"

PREPROCESSING = (
    {"QUERY", "BAD_WORDS_DICT", "STOP_WORDS_DICT", "REQUEST_OUTPUT_LEN"},
    {"INPUT_ID", "REQUEST_INPUT_LEN", "BAD_WORDS_IDS", "STOP_WORDS_IDS", "REQUEST_OUTPUT_LEN"},
    {"PROMPT_LEARNING_TASK_NAME_IDS"},  # outputs some FT revisions add
)
POSTPROCESSING = ({"TOKENS_BATCH"}, {"OUTPUT"}, {"sequence_length"})  # inputs, outputs, optional inputs


def tokenizer_role(config: mc.ModelConfig) -> str | None:
    """ "preprocessing" or "postprocessing" when the config has that model's tensors, else None."""
    inputs = {t.name for t in config.input}
    outputs = {t.name for t in config.output}
    pre_in, pre_out, pre_extra = PREPROCESSING
    if inputs == pre_in and pre_out <= outputs <= pre_out | pre_extra:
        return "preprocessing"
    post_in, post_out, post_extra = POSTPROCESSING
    if post_in <= inputs <= post_in | post_extra and outputs == post_out:
        return "postprocessing"
    return None


def load_gpt2_bpe(directory: Path):  # -> PreTrainedTokenizerFast | None
    """The GPT-2 byte-level BPE of `gpt2-vocab.json` + `gpt2-merges.txt` in `directory`, if both exist."""
    vocab, merges = directory / GPT2_VOCAB, directory / GPT2_MERGES
    if not (vocab.is_file() and merges.is_file()):
        return None
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=GPT2_END_OF_TEXT,
        eos_token=GPT2_END_OF_TEXT,
        unk_token=GPT2_END_OF_TEXT,
    )


def _strings(array: np.ndarray, name: str) -> list[str]:
    """A [B, 1] or [B] BYTES tensor -> one string per row."""
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise TritonError(f"input '{name}' has shape {list(array.shape)}; expected [batch, 1]")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array]


def csv_words(text: str) -> list[str]:
    """FT word-list string: comma-separated words (CSV quoting allowed), spaces kept ("a, b" -> "a", " b")."""
    rows = list(csv.reader([text])) if text else []
    return [w for w in rows[0] if w] if rows else []


class _TokenizerModel(TritonModel):
    def __init__(self, name: str, version: str, config: mc.ModelConfig, tokenizer) -> None:
        super().__init__()
        self.name = name
        self.version = version
        self.config = config
        self.tokenizer = tokenizer
        self.inputs, self.outputs = tensor_specs(config)

    async def infer(self, request: InferRequest) -> InferResponse:
        start = self.stats.begin()
        ok, rows = False, 0
        try:
            check_request(self, request, shapes=False)
            tensors, rows = self.run(request)
            ok = True
            return make_response(self, request, tensors)
        finally:
            self.stats.record(start, rows, ok)

    def run(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        raise NotImplementedError


class PreprocessingModel(_TokenizerModel):
    """Text and word lists in, FT token tensors out."""

    @property
    def end_id(self) -> int:
        for token_id in (self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            if token_id is not None:
                return int(token_id)
        return 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def run(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        queries = _strings(request.inputs["QUERY"], "QUERY")
        batch = len(queries)
        ids = [self.encode(q) for q in queries]
        width = max(1, max(len(i) for i in ids))
        input_id = np.full((batch, width), self.end_id, dtype=np.int64)
        for b, row in enumerate(ids):
            input_id[b, : len(row)] = row
        tensors = {
            "INPUT_ID": input_id,
            "REQUEST_INPUT_LEN": np.array([[len(i)] for i in ids], dtype=np.int64),
            "REQUEST_OUTPUT_LEN": request.inputs["REQUEST_OUTPUT_LEN"],
            "PROMPT_LEARNING_TASK_NAME_IDS": np.zeros((batch, 1), dtype=np.int64),
        }
        for source, target in (("BAD_WORDS_DICT", "BAD_WORDS_IDS"), ("STOP_WORDS_DICT", "STOP_WORDS_IDS")):
            texts = _strings(request.inputs[source], source)
            if len(texts) == 1 and batch > 1:
                texts = texts * batch
            if len(texts) != batch:
                raise TritonError(f"input '{source}' has {len(texts)} rows but 'QUERY' has {batch}")
            words = [[w for w in (self.encode(word) for word in csv_words(t)) if w] for t in texts]
            tensors[target] = to_word_list(words)
        return tensors, batch


class PostprocessingModel(_TokenizerModel):
    """FT `output_ids` in, one decoded string per beam out, flat: [batch * beam]."""

    def run(self, request: InferRequest) -> tuple[dict[str, np.ndarray], int]:
        tokens = np.asarray(request.inputs["TOKENS_BATCH"])
        if tokens.ndim == 2:
            tokens = tokens[:, None, :]
        if tokens.ndim != 3:
            raise TritonError(
                f"input 'TOKENS_BATCH' has shape {list(tokens.shape)}; expected [batch, beam, len]"
            )
        batch, beams, width = tokens.shape
        lengths = np.full((batch, beams), width, dtype=np.int64)
        if "sequence_length" in request.inputs:
            given = np.asarray(request.inputs["sequence_length"]).reshape(-1)
            if given.size not in (batch, batch * beams):
                raise TritonError(
                    f"input 'sequence_length' has {given.size} values for {batch}x{beams} beams"
                )
            lengths = given.reshape(batch, -1) * np.ones((1, beams), dtype=np.int64)
        out = np.empty(batch * beams, dtype=object)
        for b in range(batch):
            for k in range(beams):
                row = tokens[b, k, : int(lengths[b, k])].tolist()
                out[b * beams + k] = self.tokenizer.decode(row, skip_special_tokens=False).encode("utf-8")
        return {"OUTPUT": out}, batch
