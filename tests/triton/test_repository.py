"""Triton model repositories: scanning, version policies, FT parameters, broken models, explicit control."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from gptserve.engine.engine_options import EngineOptions
from gptserve.triton import repository as repo
from gptserve.triton.registry import ModelRegistry
from gptserve.triton.types import InferRequest, TritonError
from tests.triton.ft_repository import (
    POSTPROCESSING,
    PREPROCESSING,
    fastertransformer_config,
    gpt2_vocab_files,
    write_gptj_repository,
)

OPTIONS = EngineOptions(device="cpu", dtype="fp32", num_kv_blocks=32, max_model_len=64)


def write_model(root: Path, name: str, config: str, versions=("1",)) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.pbtxt").write_text(config)
    for v in versions:
        (directory / v).mkdir()
    return directory


def with_vocab(directory: Path, version: str = "1") -> None:
    vocab, merges = gpt2_vocab_files()
    (directory / version / "gpt2-vocab.json").write_bytes(vocab.read_bytes())
    (directory / version / "gpt2-merges.txt").write_bytes(merges.read_bytes())


@pytest.fixture(scope="module")
def checkpoint(tiny_models) -> Path:
    path, _ = tiny_models["gptj"]
    return path


def states(registry: ModelRegistry) -> dict[tuple[str, str], tuple[str, str]]:
    return {(r["name"], r["version"]): (r["state"], r["reason"]) for r in registry.index()}


# ------------------------------------------------------------------------------------ pure parsing
def test_version_directories_and_policies(tmp_path):
    directory = write_model(tmp_path, "m", 'backend: "python"', versions=("1", "3", "12", "0", "07", "abc"))
    assert repo.version_directories(directory) == [1, 3, 12]
    config = repo.read_config(directory, "m")
    assert repo.select_versions(config, directory) == [12]
    config.version_policy.latest.num_versions = 2
    assert repo.select_versions(config, directory) == [3, 12]
    config.version_policy.all.SetInParent()
    assert repo.select_versions(config, directory) == [1, 3, 12]
    config.version_policy.specific.versions.extend([1, 3])
    assert repo.select_versions(config, directory) == [1, 3]
    config.version_policy.specific.versions.append(5)
    with pytest.raises(repo.ModelRepositoryError, match="versions \\[5\\]"):
        repo.select_versions(config, directory)


def test_config_errors(tmp_path):
    with pytest.raises(repo.ModelRepositoryError, match="must equal the model directory name"):
        repo.read_config(write_model(tmp_path, "a", 'name: "b"\nbackend: "python"'), "a")
    with pytest.raises(repo.ModelRepositoryError, match="'platform' or 'backend'"):
        repo.read_config(write_model(tmp_path, "c", "max_batch_size: 8"), "c")
    with pytest.raises(repo.ModelRepositoryError, match="not a valid Triton ModelConfig"):
        repo.read_config(write_model(tmp_path, "d", "backend: python {"), "d")
    with pytest.raises(repo.ModelRepositoryError, match="config.pbtxt not found"):
        (tmp_path / "e").mkdir()
        repo.read_config(tmp_path / "e", "e")
    with pytest.raises(repo.ModelRepositoryError, match="no version directory"):
        directory = write_model(tmp_path, "f", 'backend: "python"', versions=("0", "x"))
        repo.select_versions(repo.read_config(directory, "f"), directory)


def ft(tmp_path: Path, name: str = "fastertransformer", **params: str):
    text = fastertransformer_config(params.pop("model_checkpoint_path", "ckpt")).replace(
        'name: "fastertransformer"', f'name: "{name}"'
    )
    directory = write_model(tmp_path, name, text)
    config = repo.read_config(directory, name)
    for key, value in params.items():
        config.parameters[key].string_value = value
    return directory, config


def test_ft_parallel_sizes_and_data_type(tmp_path, caplog):
    _, config = ft(tmp_path, pipeline_para_size="2")
    with pytest.raises(repo.ModelRepositoryError, match="pipeline_para_size is 2, but only 1"):
        repo.ft_engine_options(config, OPTIONS)
    _, config = ft(tmp_path, "ft2", tensor_para_size="4")
    assert repo.ft_engine_options(config, OPTIONS).tensor_parallel_size == 4  # the config sets the ranks
    with pytest.raises(repo.ModelRepositoryError, match="tensor_para_size is 4 .* --tensor-parallel-size 2"):
        repo.ft_engine_options(config, dataclasses.replace(OPTIONS, tensor_parallel_size=2))
    _, config = ft(tmp_path, "ft3", data_type="bf16")
    assert repo.ft_engine_options(config, EngineOptions(device="cpu")).dtype == "bf16"
    assert repo.ft_engine_options(config, OPTIONS).dtype == "fp32"  # an explicit --dtype wins
    config.parameters["data_type"].string_value = "fp16"
    with caplog.at_level(logging.INFO):
        assert repo.ft_engine_options(config, EngineOptions(device="cpu")).dtype == "auto"
    assert "fp16 on CPU" in caplog.text
    config.parameters["data_type"].string_value = "int4"
    with pytest.raises(repo.ModelRepositoryError, match="data_type 'int4'"):
        repo.ft_engine_options(config, OPTIONS)


def test_checkpoint_path_resolution(tmp_path, monkeypatch):
    directory, config = ft(tmp_path, model_checkpoint_path="weights")
    (directory / "weights").mkdir()
    assert repo.checkpoint_path(config, directory, 1) == directory / "weights"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    assert repo.checkpoint_path(config, directory, 1) == Path(os.getcwd()) / "weights"
    config.parameters["model_checkpoint_path"].string_value = "missing"
    with pytest.raises(repo.ModelRepositoryError, match="'missing' not found"):
        repo.checkpoint_path(config, directory, 1)
    del config.parameters["model_checkpoint_path"]
    with pytest.raises(repo.ModelRepositoryError, match="1/gpt-j-6b"):
        repo.checkpoint_path(config, directory, 1)
    (directory / "1" / "gpt-j-6b").mkdir()
    assert repo.checkpoint_path(config, directory, 1) == directory / "1" / "gpt-j-6b"


def test_model_names_stay_inside_the_repository():
    for bad in ("", "..", "../etc", "a/b", "a\\b", ".hidden"):
        with pytest.raises(repo.ModelRepositoryError, match="invalid model name"):
            repo.check_model_name(bad)
    repo.check_model_name("fastertransformer")


# ----------------------------------------------------------------------------------------- registry
def test_broken_models_are_unavailable_and_others_load(tmp_path):
    with_vocab(write_model(tmp_path, "preprocessing", PREPROCESSING))
    write_model(tmp_path, "onnx", 'platform: "onnxruntime_onnx"')
    write_model(
        tmp_path,
        "pp2",
        fastertransformer_config("x").replace('"fastertransformer"\nbackend', '"pp2"\nbackend'),
    )
    cmodel = tmp_path / "c-model" / "1-gpu"
    cmodel.mkdir(parents=True)
    (cmodel / "config.ini").write_text("[gptj]\n")
    write_model(
        tmp_path, "ft", fastertransformer_config(str(cmodel)).replace('name: "fastertransformer"\n', "")
    )
    write_model(tmp_path, "post", POSTPROCESSING.replace('name: "postprocessing"\n', ""))  # no vocab, no LLM
    write_model(tmp_path, "wrong", 'name: "other"\nbackend: "python"')
    write_model(
        tmp_path,
        "ens",
        'platform: "ensemble"\nensemble_scheduling { step [ { model_name: "nope" model_version: -1 '
        'input_map { key: "A" value: "X" } output_map { key: "B" value: "Y" } } ] }\n'
        'input [ { name: "X" data_type: TYPE_INT32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_INT32 dims: [ 1 ] } ]',
    )
    write_model(
        tmp_path,
        "ens-ft",
        'platform: "ensemble"\nensemble_scheduling { step [ { model_name: "ft" model_version: -1 '
        'input_map { key: "input_ids" value: "X" } output_map { key: "output_ids" value: "Y" } } ] }\n'
        'input [ { name: "X" data_type: TYPE_UINT32 dims: [ -1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_UINT32 dims: [ -1, -1 ] } ]',
    )
    registry = ModelRegistry([tmp_path], OPTIONS)
    registry.load_all()
    s = states(registry)
    # an ensemble whose step failed is not ready either, and says why
    assert s[("ens-ft", "1")][0] == "UNAVAILABLE" and "'ft'" in s[("ens-ft", "1")][1]
    assert "c-model" in s[("ens-ft", "1")][1]
    assert {row["name"] for row in registry.failed()} >= {"onnx", "ft", "ens-ft"}
    assert s[("preprocessing", "1")] == ("READY", "")
    assert s[("onnx", "1")][0] == "UNAVAILABLE" and "onnxruntime_onnx" in s[("onnx", "1")][1]
    assert s[("ft", "1")][0] == "UNAVAILABLE" and "c-model" in s[("ft", "1")][1]  # config.ini, no weights
    assert "needs a tokenizer" in s[("post", "1")][1]
    assert "must equal the model directory name" in s[("wrong", "")][1]
    assert "not in the repository: ['nope']" in s[("ens", "1")][1]
    assert [r["name"] for r in registry.index(ready_only=True)] == ["preprocessing"]
    assert not registry.ready
    assert registry.get("preprocessing").name == "preprocessing"
    with pytest.raises(TritonError) as info:
        registry.get("onnx")
    assert info.value.status == 503
    with pytest.raises(TritonError) as info:
        registry.get("preprocessing", "2")
    assert info.value.status == 404
    with pytest.raises(TritonError) as info:
        registry.get("absent")
    assert info.value.status == 404


def test_pipeline_parallel_model_is_unavailable_with_reason(tmp_path, checkpoint):
    text = fastertransformer_config(str(checkpoint)).replace(
        'string_value: "1"\n  }\n}\nparameters {\n  key: "data_type"',
        'string_value: "2"\n  }\n}\nparameters {\n  key: "data_type"',
    )
    write_model(tmp_path, "fastertransformer", text)
    registry = ModelRegistry([tmp_path], OPTIONS)
    registry.load_all()
    state, reason = states(registry)[("fastertransformer", "1")]
    assert state == "UNAVAILABLE" and "pipeline_para_size is 2" in reason


def test_preprocessing_and_postprocessing_models(tmp_path):
    with_vocab(write_model(tmp_path, "preprocessing", PREPROCESSING))
    with_vocab(write_model(tmp_path, "postprocessing", POSTPROCESSING))
    registry = ModelRegistry([tmp_path], OPTIONS)
    registry.load_all()
    pre, post = registry.get("preprocessing"), registry.get("postprocessing")
    request = InferRequest(
        "preprocessing",
        inputs={
            "QUERY": np.array([[b"Hello world"], [b"Hi"]], dtype=object),
            "BAD_WORDS_DICT": np.array([[b"Hawks, Hawks"], [b""]], dtype=object),
            "STOP_WORDS_DICT": np.array([[b""], [b'month,"a, b"']], dtype=object),
            "REQUEST_OUTPUT_LEN": np.array([[8], [8]], dtype=np.uint32),
        },
    )
    out = asyncio.run(pre.infer(request))
    ids = out.output("INPUT_ID")
    assert ids.dtype == np.uint32 and ids.tolist() == [[15496, 995], [17250, 50256]]
    assert out.output("REQUEST_INPUT_LEN").tolist() == [[2], [1]]
    assert out.output("REQUEST_OUTPUT_LEN").tolist() == [[8], [8]]
    bad = out.output("BAD_WORDS_IDS")
    assert bad.dtype == np.int32 and bad.shape[:2] == (2, 2)
    assert bad[0].tolist() == [[39, 11890, 23445], [2, 3, -1]]  # "Hawks" and " Hawks"
    assert bad[1].tolist() == [[0, 0, 0], [-1, -1, -1]]
    stop = out.output("STOP_WORDS_IDS")
    assert stop[1, 1, :2].tolist() == [1, 4]  # "month", then "a, b" (one CSV-quoted word, 3 tokens)
    tokens = np.array([[[15496, 995, 50256, 50256]], [[17250, 50256, 50256, 50256]]], dtype=np.uint32)
    decoded = asyncio.run(post.infer(InferRequest("postprocessing", inputs={"TOKENS_BATCH": tokens})))
    # FT's model.py: one flat string per beam, the whole row decoded, end-id padding included
    assert decoded.output("OUTPUT").tolist() == [
        b"Hello world<|endoftext|><|endoftext|>",
        b"Hi<|endoftext|><|endoftext|><|endoftext|>",
    ]
    assert pre.stats.inference_count == 2 and post.stats.execution_count == 1


def test_control_mode_none_refuses_load_and_unload(tmp_path):
    registry = ModelRegistry([tmp_path], OPTIONS)
    registry.load_all()
    with pytest.raises(TritonError, match="--model-control-mode explicit"):
        asyncio.run(registry.load("x"))
    with pytest.raises(TritonError, match="--model-control-mode explicit"):
        asyncio.run(registry.unload("x"))


def test_explicit_load_and_unload(tmp_path, checkpoint):
    write_gptj_repository(tmp_path, checkpoint)
    (tmp_path / "fastertransformer" / "config.pbtxt").write_text(
        (tmp_path / "fastertransformer" / "config.pbtxt").read_text().replace("50256", "0")
    )
    registry = ModelRegistry([tmp_path], OPTIONS, explicit=True)
    registry.load_all()
    assert {r["state"] for r in registry.index()} == {""} and registry.models() == []

    async def scenario():
        await registry.start()
        for bad in ("../fastertransformer", "a/b", ".."):
            with pytest.raises(TritonError, match="invalid model name"):
                await registry.load(bad)
        with pytest.raises(TritonError, match="no model directory 'missing'"):
            await registry.load("missing")
        await registry.load("ensemble")  # loads its step models too
        assert {r["name"] for r in registry.index(ready_only=True)} == {
            "ensemble",
            "fastertransformer",
            "preprocessing",
            "postprocessing",
        }
        model = registry.get("fastertransformer")
        request = InferRequest(
            "fastertransformer",
            inputs={
                "input_ids": np.array([[1, 2, 3]], np.uint32),
                "request_output_len": np.array([[3]], np.uint32),
                "input_lengths": np.array([[3]], np.uint32),
            },
        )
        response = await model.infer(request)
        assert response.output("output_ids").shape == (1, 1, 6)
        await registry.unload("ensemble", unload_dependents=True)
        assert registry.models() == []
        assert all(r["state"] == "UNAVAILABLE" and r["reason"] == "unloaded" for r in registry.index())
        assert registry.llm_engines() == []
        with pytest.raises(TritonError, match="not running") as info:
            await model.infer(request)  # its engine stopped with the unload
        assert info.value.status == 503
        with pytest.raises(TritonError) as info:
            registry.get("fastertransformer")
        assert info.value.status == 404
        config = json.dumps(
            {
                "name": "postprocessing",
                "backend": "python",
                "max_batch_size": 8,
                "input": [{"name": "TOKENS_BATCH", "data_type": "TYPE_UINT32", "dims": [-1, -1]}],
                "output": [{"name": "OUTPUT", "data_type": "TYPE_STRING", "dims": [-1, -1]}],
            }
        )
        vocab, merges = gpt2_vocab_files()
        files = {"file:2/gpt2-vocab.json": vocab.read_bytes(), "file:2/gpt2-merges.txt": merges.read_bytes()}
        await registry.load("postprocessing", config_json=config, files=files)
        assert registry.get("postprocessing").version == "2"
        with pytest.raises(TritonError, match="relative path inside"):
            await registry.load("postprocessing", config_json=config, files={"file:../x": b""})
        await registry.stop()

    asyncio.run(scenario())
