"""On a GPU, greedy tokens and top-5 log-probabilities equal Hugging Face transformers run on the same
device in the same dtype, with decode steps replayed from CUDA graphs and run eagerly (GPU only).

float32: identical tokens, log-probabilities within 2e-3 (the two sides use different kernels).
bfloat16: logits are rounded to 8 significant bits, so two tokens can tie or nearly tie and differently
ordered reductions pick either; as in vLLM's `check_logprobs_close`, tokens must match until a step where
Hugging Face rates both candidates within 0.15 of each other, and log-probabilities agree within 0.15
up to there; float16 (11 bits) likewise within 0.05. The same test passes with the plain-PyTorch CPU
path against CPU transformers. Models 256 wide run their one-row products through the Triton GEMV, and
match in float16.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gptserve import LLM, SamplingParams
from gptserve.layers.linear import Linear
from gptserve.layers.tuned_linear import TunedLinear
from tests.conftest import ARCHS, build_tiny_model, random_prompts

pytestmark = pytest.mark.gpu

NEW_TOKENS = 24
LENGTHS = [3, 17, 40]  # three sequences: the size-4 graph runs with one padding row
TOLERANCE = {"fp32": 2e-3, "fp16": 0.05, "bf16": 0.15}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt], device="cuda"),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device="cuda"),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.log_softmax(torch.stack([lg[0] for lg in out.logits]).float(), dim=-1).cpu()


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gpu_greedy_matches_transformers(arch, dtype, enforce_eager, tiny_models):
    path, cpu_model = tiny_models[arch]
    hf_model = copy.deepcopy(cpu_model).to("cuda", DTYPES[dtype])
    llm = LLM(str(path), dtype=dtype, device="cuda", max_num_batched_tokens=64, enforce_eager=enforce_eager)
    assert (llm.engine.runner.graphs is None) == enforce_eager
    prompts = random_prompts(len(LENGTHS), cpu_model.config.vocab_size, LENGTHS, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        _check_against_hf(hf_model, prompt, out.outputs[0], dtype)
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


def _check_against_hf(hf_model: torch.nn.Module, prompt: list[int], completion, dtype: str) -> None:
    tol = TOLERANCE[dtype]
    ref_tokens, ref_logprobs = _hf_greedy(hf_model, prompt)
    if dtype == "fp32":
        assert completion.token_ids == ref_tokens
    for step, entry in enumerate(completion.logprobs):
        if entry.token_id != ref_tokens[step]:  # bf16 only: a near-tie, after which histories differ
            gap = ref_logprobs[step, ref_tokens[step]] - ref_logprobs[step, entry.token_id]
            assert gap.item() < tol, f"step {step}: {entry.token_id} instead of {ref_tokens[step]}"
            break
        assert abs(entry.logprob - ref_logprobs[step, entry.token_id].item()) < tol
        ref_top = ref_logprobs[step].topk(5).values.tolist()
        assert max(abs(lp - ref) for (_, lp), ref in zip(entry.top, ref_top)) < tol


@pytest.mark.parametrize("arch", ARCHS)
def test_lone_prompts_replay_prefill_graphs(arch, tiny_models):
    """One request at a time: its prompt runs from a prefill graph (padded to 32 or 64 tokens; 32 fills
    its graph exactly), its decode steps from decode graphs, and the output matches transformers."""
    path, cpu_model = tiny_models[arch]
    hf_model = copy.deepcopy(cpu_model).to("cuda", torch.bfloat16)
    llm = LLM(str(path), dtype="bf16", device="cuda", enable_prefix_caching=False)
    graphs = llm.engine.runner.graphs
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    prompts = random_prompts(3, cpu_model.config.vocab_size, [3, 32, 40], seed=4)
    for prompt in prompts:
        (out,) = llm.generate([prompt], params)
        _check_against_hf(hf_model, prompt, out.outputs[0], "bf16")
    assert graphs.replays["prefill"] == len(prompts)
    assert graphs.replays["decode"] == len(prompts) * (NEW_TOKENS - 1)
    assert llm.engine.core.kv.num_free_blocks == llm.engine.core.kv.num_blocks


# Every weight a GEMV tile divides; half the usual init for four times the width keeps activations and
# logits at the narrow models' scale (larger logits would carry larger rounding errors).
WIDE = {
    "llama": dict(hidden_size=256, intermediate_size=512, initializer_range=0.1),
    "gptj": dict(n_embd=256, initializer_range=0.1),
    "gpt_neox": dict(hidden_size=256, intermediate_size=512, initializer_range=0.1),
    "gpt2": dict(n_embd=256, initializer_range=0.1),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_one_row_gemv_matches_transformers(arch, tmp_path):
    """256 wide: every linear layer multiplies one row with the Triton GEMV (a lone sequence's decode
    steps, replayed from graphs), and the output matches transformers in fp16; `gemv="cublas"` keeps the
    plain layers."""
    cpu_model = build_tiny_model(arch, tmp_path, **WIDE[arch])
    hf_model = copy.deepcopy(cpu_model).to("cuda", torch.float16)
    llm = LLM(str(tmp_path), dtype="fp16", device="cuda", enable_prefix_caching=False)
    net = llm.engine.runner.model
    wrapped = [m for m in net.modules() if isinstance(m, TunedLinear)]
    inner = {id(m.inner) for m in wrapped}
    assert len(wrapped) >= 4 * cpu_model.config.num_hidden_layers and all(1 in m.configs for m in wrapped)
    assert not [m for m in net.modules() if type(m) is Linear and id(m) not in inner]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=5, ignore_eos=True)
    for prompt in random_prompts(2, cpu_model.config.vocab_size, [5, 40], seed=6):
        (out,) = llm.generate([prompt], params)
        _check_against_hf(hf_model, prompt, out.outputs[0], "fp16")
    assert llm.engine.runner.graphs.replays["decode"] == 2 * (NEW_TOKENS - 1)
    del llm
    plain = LLM(str(tmp_path), dtype="fp16", device="cuda", gemv="cublas")
    assert not [m for m in plain.engine.runner.model.modules() if isinstance(m, TunedLinear)]
