"""gptserve: a local GPT inference server with continuous batching and a paged KV cache."""

from gptserve.llm import LLM
from gptserve.outputs import CompletionOutput, RequestOutput
from gptserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
