"""How often the embedded SmolLM2 loops or starts from its distribution's far tail, at the chat page's
old sampling values (temperature 0.7, top-p 1) and at the model's defaults (its card's temperature 0.2,
top-p 0.9): 20 everyday chat prompts, one seeded answer each per setting, requests of both settings
interleaved in one batch.

An answer loops when some 4-gram of its tokens occurs more than 5 times; its start is unlikely when its
first token had probability under 1% under the model's raw distribution.

    python -m gptserve.bench.sampling_defaults [--max-tokens 512]
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

from gptserve.llm import LLM
from gptserve.sampling_params import SamplingParams

PROMPTS = [
    "Write a haiku about GPUs.",
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "How do I boil an egg?",
    "Explain what a black hole is in simple terms.",
    "Write a short birthday message for my sister.",
    "What should I cook for dinner tonight?",
    "Summarize the plot of Romeo and Juliet.",
    "How can I stay focused while studying?",
    "Tell me a joke about cats.",
    "What are the benefits of drinking water?",
    "Write a limerick about a programmer.",
    "How do plants make their food?",
    "Suggest a name for a new coffee shop.",
    "What is the difference between weather and climate?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Write a two-sentence horror story.",
    "How do I politely decline a meeting invitation?",
    "What are some good exercises for beginners?",
]
SETTINGS = {
    "old page (temperature 0.7, top-p 1)": {"temperature": 0.7, "top_p": 1.0},
    "model defaults (temperature 0.2, top-p 0.9)": {"temperature": 0.2, "top_p": 0.9},
}


def loops(token_ids: list[int], n: int = 4, times: int = 5) -> bool:
    """Whether some n-gram of `token_ids` occurs more than `times` times."""
    grams = Counter(tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1))
    return any(count > times for count in grams.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    llm = LLM()
    tokenizer = llm.tokenizer
    prompts, params, names = [], [], []
    for seed, prompt in enumerate(PROMPTS):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for name, values in SETTINGS.items():  # the two settings alternate
            prompts.append(text)
            params.append(SamplingParams(max_tokens=args.max_tokens, seed=seed, logprobs=0, **values))
            names.append(name)
    outputs = llm.generate(prompts, params)
    for name in SETTINGS:
        answers = [o.outputs[0] for o, n in zip(outputs, names) if n == name]
        looping = sum(loops(a.token_ids) for a in answers)
        unlikely = sum(math.exp(a.logprobs[0].logprob) < 0.01 for a in answers if a.logprobs)
        tokens = sum(len(a.token_ids) for a in answers)
        print(f"{name}: {looping}/{len(answers)} loop, {unlikely}/{len(answers)} start with a token of "
              f"p < 1%, {tokens / len(answers):.0f} tokens per answer")  # fmt: skip
        for a, prompt in zip(answers, PROMPTS):
            print(f"  {prompt!r} -> {a.text[:70]!r}")


if __name__ == "__main__":
    main()
