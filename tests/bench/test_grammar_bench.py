"""`gptserve bench grammar` at small sizes: both variants timed over decode steps of the whole batch, on a
model with a tokenizer and on one without (the GPT-2 tokenizer then serves the grammar); the engine's
methods are its own again afterwards; a vocabulary too small for GPT-2's tokenizer is refused by name."""

from __future__ import annotations

import json

import pytest

from gptserve.bench.grammar import decode_steps
from gptserve.cli import main
from gptserve.engine.grammar import GrammarState
from gptserve.layers import logits_processors
from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams, StructuredOutputs

FLAGS = ["--device", "cpu", "--dtype", "fp32", "--max-model-len", "256", "--max-num-seqs", "4"]


@pytest.mark.parametrize("model", ["tiny_gptj_tokenized", "tiny_gptj"], ids=["tokenizer", "no-tokenizer"])
def test_both_variants_at_two_batch_sizes(request, tmp_path, capsys, model):
    path = request.getfixturevalue(model)
    path = path[0] if isinstance(path, tuple) else path
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}}))
    out = tmp_path / "figures.json"
    argv = ["bench", "grammar", str(path), *FLAGS, "--json-schema", str(schema), "--batch-sizes", "1,3",
            "--rounds", "2", "--output-len", "6", "--input-len", "8", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "batch 3 json schema" in printed and "apply alone, batch 3" in printed
    figures = json.loads(out.read_text())["batches"]
    for batch in ("1", "3"):
        f = figures[batch]
        assert f["unconstrained_ms_per_step"] > 0 and f["constrained_ms_per_step"] > 0
        assert f["steps_timed"]["unconstrained"] == 2 * 5  # 2 rounds of 5 decode steps after the first
        assert f["fill_ms_per_step"] > 0 and f["apply_ms_per_step"] > 0 and f["accept_ms_per_step"] > 0
        assert f["grammar_ms_per_step"] >= f["fill_ms_per_step"]


def test_decode_steps_puts_the_engine_back(tiny_gptj_tokenized):
    llm = LLM(str(tiny_gptj_tokenized), device="cpu", dtype="fp32", max_model_len=128)
    apply, accept = logits_processors.apply_token_bitmask, GrammarState.accept
    params = SamplingParams(
        temperature=0.0, max_tokens=5, structured_outputs=StructuredOutputs(json={"type": "object"})
    )
    times = decode_steps(llm, [[300, 301, 302], [400, 401]], params)
    assert len(times["step"]) == len(times["fill"]) == len(times["apply"]) == len(times["accept"]) >= 1
    assert logits_processors.apply_token_bitmask is apply and GrammarState.accept is accept
    assert "_grammar_masks" not in vars(llm.engine.core)


def test_a_vocabulary_smaller_than_gpt2_is_refused(capsys):
    argv = ["bench", "grammar", "--random-weights", "gptj-tiny", "--device", "cpu", "--batch-sizes", "1"]
    assert main(argv) == 2
    assert "smaller than the GPT-2 tokenizer" in capsys.readouterr().err
