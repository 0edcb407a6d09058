"""gptserve: a local GPT inference server with continuous batching and a paged KV cache."""

import os

# Set before torch loads OpenMP: with the default (spinning) wait policy, each parallel region on a
# machine whose cores are also busy with other work waits for descheduled threads, and decoding slows
# down twenty-fold. Passive waiting costs little when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gptserve.llm import LLM  # noqa: E402
from gptserve.outputs import CompletionOutput, RequestOutput  # noqa: E402
from gptserve.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
