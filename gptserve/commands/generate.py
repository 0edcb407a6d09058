"""`gptserve generate`: one-shot offline generation that prints the text."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import add_engine_args

    p = sub.add_parser("generate", help="generate text offline and print it")
    add_engine_args(p)
    p.add_argument("-p", "--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--beam-width", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")


def run(args: argparse.Namespace) -> int:
    from gptserve.cli import engine_options
    from gptserve.llm import LLM
    from gptserve.sampling_params import SamplingParams

    llm = LLM(args.model, **vars(engine_options(args)))
    prompts = args.prompt
    if args.chat:
        tok = llm.tokenizer
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        beam_width=args.beam_width,
    )
    for out in llm.generate(prompts, params):
        for completion in out.outputs:
            sys.stdout.write(completion.text + "\n")
    return 0
