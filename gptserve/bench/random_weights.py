"""Random-weight models of published shapes, for benchmarks that need no checkpoint and no tokenizer.

`random_checkpoint("gptj-6b", device, dtype)` is a `Checkpoint` like any reader's: a Hugging Face config
dictionary and a stream of Hugging Face named weights, here drawn on `device` in `dtype`. Each tensor comes
from its own generator, seeded by the seed and the tensor's name, so every pass over the weights yields
the same values: the engine and the Hugging Face baseline (`hf_model_from_checkpoint`) load identical
models. Linear and embedding weights and biases are N(0, 0.02), norm weights 1 + N(0, 0.02).
Prompts are token ids.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch

from gptserve.errors import GptServeError
from gptserve.loading.checkpoint import Checkpoint

# Hugging Face config dictionaries of the shapes a benchmark may ask for by name.
RANDOM_MODELS: dict[str, dict[str, Any]] = {
    "gptj-6b": dict(
        model_type="gptj",
        vocab_size=50400,
        n_embd=4096,
        n_layer=28,
        n_head=16,
        rotary_dim=64,
        n_inner=16384,
        n_positions=2048,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    ),
    "gptj-tiny": dict(
        model_type="gptj",
        vocab_size=512,
        n_embd=64,
        n_layer=2,
        n_head=4,
        rotary_dim=8,
        n_inner=256,
        n_positions=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    ),
}
STD = 0.02


def parameter_shapes(hf_config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the Hugging Face model, in its order, tied ones once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(hf_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    return [(name, tuple(p.shape)) for name, p in net.named_parameters()]


def random_tensor(
    name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """The value of parameter `name`: the same for the same (name, shape, seed) on a given device."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).mul_(STD)
    if len(shape) == 1 and name.endswith("weight"):  # a norm's scale
        values.add_(1.0)
    return values.to(dtype)


def random_checkpoint(name: str, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> Checkpoint:
    """A checkpoint of the named shape (`RANDOM_MODELS`) whose weights are drawn on `device`."""
    if name not in RANDOM_MODELS:
        raise GptServeError(f"unknown random-weight model {name!r}; known: {', '.join(RANDOM_MODELS)}")
    hf_config = dict(RANDOM_MODELS[name])
    device = torch.device(device)
    shapes = parameter_shapes(hf_config)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        for param, shape in shapes:
            yield param, random_tensor(param, shape, device, dtype, seed)

    return Checkpoint(
        hf_config=hf_config,
        weights=weights,
        tokenizer=None,
        chat_template=None,
        source=f"random weights ({name}, seed {seed})",
    )


def hf_model_from_checkpoint(
    checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str
) -> torch.nn.Module:
    """The Hugging Face transformers model of `checkpoint`'s config on `device`, its weights copied in."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(checkpoint.hf_config)
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, tensor in checkpoint.weights():
            params.pop(name).copy_(tensor)
    if params:
        raise GptServeError(f"the random checkpoint lacks {sorted(params)[:5]}")
    net.generation_config.eos_token_id = None  # generate exactly the requested lengths
    net.generation_config.pad_token_id = 0
    return net.eval()
