"""Int8 weight-only conversion of the embedded SmolLM2 GGUF: compact files, Int8Linear layers, same tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from gptserve.cli import main
from gptserve.layers.quantized_linear import Int8Linear
from gptserve.llm import LLM
from gptserve.loading.converted_writer import quantize_int8
from gptserve.loading.loader import load_checkpoint
from gptserve.sampling_params import SamplingParams

TOKENS = 64
QUESTIONS = [
    "Write two sentences about the sea.",
    "What is the capital of France?",
    "Explain gravity to a child.",
]
ENGINE = dict(device="cpu", dtype="fp32", num_kv_blocks=64, max_model_len=256, block_size=16)


@pytest.fixture(scope="module")
def int8_dir(smollm2_path, tmp_path_factory):
    dst = tmp_path_factory.mktemp("smollm2") / "int8"
    assert main(["convert", str(smollm2_path), str(dst), "--dtype", "fp16", "--quantize", "int8"]) == 0
    return dst


def test_int8_halves_the_linear_weight_bytes(int8_dir):
    assert json.loads((int8_dir / "config.json").read_text())["gptserve"]["quantization"] == "int8"
    quantized = fp16_of_quantized = total = 0
    with safe_open(str(int8_dir / "model-rank-0-of-1.safetensors"), framework="pt") as f:
        names = set(f.keys())
        for name in names:
            piece = f.get_slice(name)
            numel, dtype = 1, piece.get_dtype()
            for n in piece.get_shape():
                numel *= n
            size = numel * (1 if dtype == "I8" else 2)
            total += size
            if dtype == "I8" or name.endswith(".scale"):
                quantized += size
                fp16_of_quantized += 0 if name.endswith(".scale") else 2 * numel
            else:
                assert dtype == "F16", name
    assert any(name.endswith("q_proj.weight.scale") for name in names)
    assert quantized <= 0.51 * fp16_of_quantized
    # The tied embedding (a fifth of SmolLM2) stays fp16, as norms do.
    fp16_total = total - quantized + fp16_of_quantized
    assert total <= 0.65 * fp16_total


def test_int8_dir_loads_as_int8_linear_layers(int8_dir, smollm2_path):
    checkpoint = load_checkpoint(int8_dir)
    original = load_checkpoint(smollm2_path)
    assert checkpoint.chat_template == original.chat_template
    text = "The capital of France is"
    assert checkpoint.tokenizer.encode(text) == original.tokenizer.encode(text)
    llm = LLM(str(int8_dir), **ENGINE)
    try:
        linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, Int8Linear)]
        assert len(linears) >= 4 * 30  # q|k|v, o, gate|up, down in each of the 30 layers, and the head
        assert all(layer.dense is None for layer in linears)
        params = SamplingParams(max_tokens=4, ignore_eos=True)  # sampled: an end-of-text token may come first
        assert len(llm.generate(text, params)[0].outputs[0].token_ids) == 4
    finally:
        llm.close()


def test_int8_keeps_top1_over_64_greedy_tokens(int8_dir, smollm2_path):
    """Teacher-forced: after each prefix of the unquantized greedy continuation, the int8 weights'
    top-1 (computed in one forward of the dequantized weights, head int8 as the engine loads it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    original = load_checkpoint(smollm2_path)
    tokenizer = original.tokenizer
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )
        for q in QUESTIONS
    ]
    reference = LLM(str(smollm2_path), quantization="none", **ENGINE)
    try:
        greedy = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
        continuations = [list(o.outputs[0].token_ids) for o in reference.generate(prompts, greedy)]
    finally:
        reference.close()

    config = {k: v for k, v in load_checkpoint(int8_dir).hf_config.items() if k != "gptserve"}
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    weights = {name: tensor.float() for name, tensor in load_checkpoint(int8_dir).weights()}
    q, scale = quantize_int8(weights["model.embed_tokens.weight"])  # the tied head, quantized at load
    model.load_state_dict(weights, strict=False)
    model.lm_head.weight = torch.nn.Parameter(q.float() * scale.float()[:, None], requires_grad=False)
    agree = 0
    with torch.no_grad():
        for prompt, continuation in zip(prompts, continuations):
            logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1 : -1]
            agree += int((logits.argmax(-1) == torch.tensor(continuation)).sum())
    assert agree >= 0.95 * TOKENS * len(prompts)
