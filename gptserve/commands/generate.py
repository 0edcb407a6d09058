"""`gptserve generate`: one-shot offline generation that prints the text."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptserve.errors import GptServeError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import HelpFormatter, add_engine_args

    p = sub.add_parser(
        "generate",
        help="generate text offline and print it",
        description="Generate text for each prompt and print it. Prompts come from -p/--prompt, or "
        'positionally: `gptserve generate "Hello"`, `gptserve generate MODEL "Hello"` (of two '
        "positionals the first is MODEL; a lone one is MODEL only if it is an existing path or .gguf file).",
        formatter_class=HelpFormatter,
    )
    add_engine_args(p)
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt(s), when -p is not used")
    p.add_argument("-p", "--prompt", action="append", default=None, help="prompt (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass")
    p.add_argument("-n", "--n", type=int, default=1, help="completions per prompt")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--beam-width", type=int, default=1, help="beam search width; 1 = no beam search")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")


def _model_and_prompts(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """MODEL and the prompts: with -p the positional is MODEL; without it, of two or more positionals the
    first is MODEL, and a lone one is MODEL only if it names an existing path or a .gguf file."""
    if args.prompt:
        if args.prompts:
            raise GptServeError("give prompts with -p or positionally, not both")
        return args.model, args.prompt
    positionals = ([args.model] if args.model is not None else []) + list(args.prompts)
    model = None
    lone = len(positionals) == 1
    if len(positionals) > 1 or (lone and (Path(positionals[0]).exists() or positionals[0].endswith(".gguf"))):
        model = positionals.pop(0)
    if not positionals:
        raise GptServeError('no prompt: give one, e.g. gptserve generate "Hello" (or -p PROMPT)')
    return model, positionals


def run(args: argparse.Namespace) -> int:
    from gptserve.cli import engine_options, sampling_params_from_flags
    from gptserve.llm import LLM

    model, prompts = _model_and_prompts(args)
    # Every flag is checked before the model loads: a typo costs no loading time.
    params = sampling_params_from_flags(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        n=args.n,
        seed=args.seed,
        beam_width=args.beam_width,
    )
    options = engine_options(args)
    llm = LLM(model, **vars(options))
    if args.chat:
        tok = llm.tokenizer
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    for out in llm.generate(prompts, params):
        for completion in out.outputs:
            sys.stdout.write(completion.text + "\n")
    return 0
