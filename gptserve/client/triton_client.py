"""Triton's KServe v2 protocol over HTTP (JSON `infer`, `generate_stream`) or gRPC (`ModelInfer`,
`ModelStreamInfer`), for the three kinds of generating model a Triton client meets:

- "text": a model served by `gptserve serve MODEL` (or Triton's LLM backends): `text_input`,
  `max_tokens`, `stream` -> `text_output`;
- "ensemble": FasterTransformer's GPT-J ensemble, the tutorial's entry point: `INPUT_0` prompt,
  `INPUT_1` output length, `INPUT_2`/`INPUT_3` bad/stop words as CSV -> `OUTPUT_0` (prompt included);
- "tokens": FasterTransformer's token-level model: `input_ids`, `input_lengths`, `request_output_len`
  -> `output_ids` (prompt included), `sequence_length`.

The sampling scalars keep FasterTransformer's names and each goes in the datatype the model's metadata
declares. FasterTransformer decodes greedily when top-k and top-p are both 0, so sampling with only a
temperature sends top-k 0 and top-p 1. Words for `bad_words_list`/`stop_words_list` are tokenized by the
server's `/tokenize` route (on its HTTP port; `http_url` when talking gRPC); a text-form model that takes
`stop_words`/`bad_words` gets them as strings instead.
"""

from __future__ import annotations

import csv
import io
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from gptserve.client.http_common import auth_headers, check_response, connect_error, sse_events
from gptserve.client.types import ClientError, OnText, Options, Prompt, Result

DATATYPES = {
    "BOOL": np.bool_, "UINT32": np.uint32, "UINT64": np.uint64, "INT32": np.int32, "INT64": np.int64,
    "FP32": np.float32, "BYTES": np.object_,
}  # fmt: skip
END_OF_TEXT = "<|endoftext|>"  # GPT-2's end id as text: FT's postprocessing pads its output with it
GENERATE_FIELDS = ("id", "model_name", "model_version")  # a generate response's fields that are no output


@dataclass
class ModelInterface:
    """A model's kind ("text", "ensemble" or "tokens") and the datatype of each input."""

    name: str
    kind: str
    inputs: dict[str, str]


def interface_of(name: str, metadata: dict[str, Any]) -> ModelInterface | None:
    """The generating interface of a model from its metadata, or None if it is no generating model."""
    inputs = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
    for kind, marker in (("text", "text_input"), ("ensemble", "INPUT_0"), ("tokens", "input_ids")):
        if marker in inputs:
            return ModelInterface(name, kind, inputs)
    return None


def words_csv(words: list[str]) -> str:
    """Words as the one CSV line FasterTransformer's preprocessing reads."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(words)
    return out.getvalue()


def word_list(words: list[list[int]]) -> np.ndarray:
    """Token lists -> FasterTransformer's word list [1, 2, L] int32 (ids; cumulative end offsets)."""
    flat = [t for w in words for t in w]
    width = max(1, len(flat), len(words))
    out = np.zeros((1, 2, width), dtype=np.int32)
    out[0, 1, :] = -1
    out[0, 0, : len(flat)] = flat
    out[0, 1, : len(words)] = np.cumsum([len(w) for w in words])
    return out


class TritonClient:
    """A thread-safe client of one Triton model over HTTP or gRPC."""

    def __init__(
        self,
        protocol: str,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        http_url: str | None = None,
        timeout: float = 600,
    ):
        self.protocol = protocol
        self.api_key = api_key
        self.timeout = timeout
        if protocol == "http":
            self.url = url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"
            self.http_url = self.url
        else:
            self.url = url.split("://", 1)[-1].rstrip("/")
            self.http_url = (http_url or f"http://{self.url.rsplit(':', 1)[0]}:8000").rstrip("/")
        self.http = httpx.Client(headers=auth_headers(api_key), timeout=timeout)
        self._local = threading.local()  # one gRPC client per thread: a client holds one stream at most
        self._requested_model = model
        self._interface: ModelInterface | None = None
        self._word_ids: dict[str, list[int]] = {}

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------------------- transport basics
    def _grpc(self):  # -> tritonclient.grpc.InferenceServerClient
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as grpcclient

            client = self._local.client = grpcclient.InferenceServerClient(self.url)
        return client

    def _grpc_headers(self) -> dict[str, str] | None:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else None

    def _http_json(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self.http.request(method, f"{self.url}{path}", json=body)
        except httpx.TransportError as e:
            raise connect_error(self.url, e) from None
        check_response(response)
        return response.json()

    def _grpc_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return getattr(self._grpc(), method)(*args, headers=self._grpc_headers(), **kwargs)
        except InferenceServerException as e:
            raise ClientError(_grpc_message(e, self.url)) from None

    # ----------------------------------------------------------------------------------- the model
    @property
    def interface(self) -> ModelInterface:
        """The model asked for, or else the first ready one with text in (a served model, then
        FasterTransformer's ensemble), else the first taking token ids."""
        if self._interface is None:
            if self._requested_model is not None:
                names = [self._requested_model]
            elif self.protocol == "http":
                names = [m["name"] for m in self._http_json("POST", "/v2/repository/index", {"ready": True})]
            else:
                index = self._grpc_call("get_model_repository_index", as_json=True)
                names = [m["name"] for m in index.get("models", []) if m.get("state", "READY") == "READY"]
            found = [i for i in map(self._describe, dict.fromkeys(names)) if i is not None]
            if not found:
                which = self._requested_model or "no model on the server"
                raise ClientError(f"{which}: not a generating model (no text_input, INPUT_0 or input_ids)")
            order = {"text": 0, "ensemble": 1, "tokens": 2}
            self._interface = min(found, key=lambda i: order[i.kind])
        return self._interface

    def _describe(self, name: str) -> ModelInterface | None:
        if self.protocol == "http":
            metadata = self._http_json("GET", f"/v2/models/{name}")
        else:
            metadata = self._grpc_call("get_model_metadata", name, as_json=True)
        return interface_of(name, metadata)

    @property
    def model(self) -> str:
        return self.interface.name

    # ---------------------------------------------------------------------------------- the request
    def _tokens(self, word: str) -> list[int]:
        if word not in self._word_ids:
            try:
                response = self.http.post(
                    f"{self.http_url}/tokenize", json={"prompt": word, "add_special_tokens": False}
                )
            except httpx.TransportError as e:
                raise connect_error(f"{self.http_url} (to tokenize bad/stop words)", e) from None
            check_response(response)
            self._word_ids[word] = list(response.json()["tokens"])
        return self._word_ids[word]

    def _count_tokens(self, text: str) -> int | None:
        """The tokens of `text` by the server's tokenizer (`/tokenize`), or None where it cannot say."""
        if not text:
            return 0
        try:
            response = self.http.post(
                f"{self.http_url}/tokenize", json={"prompt": text, "add_special_tokens": False}
            )
            if response.status_code != 200:
                return None
            return len(response.json()["tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    def tensors(self, prompt: Prompt, options: Options) -> dict[str, np.ndarray]:
        """The request's input tensors, each in the datatype the model declares."""
        model = self.interface
        tensors: dict[str, Any] = {}
        as_tokens = model.kind == "tokens" or not isinstance(prompt, str)
        if as_tokens:
            if "input_ids" not in model.inputs:
                raise ClientError(f"model '{model.name}' takes text; this prompt is token ids")
            if isinstance(prompt, str):
                raise ClientError(f"model '{model.name}' takes token ids: give prompts as JSON Lines lists")
            tensors.update(input_ids=[prompt], input_lengths=[[len(prompt)]])
            tensors["request_output_len"] = [[options.max_tokens]]
        elif model.kind == "text":
            tensors.update(text_input=[[prompt]], max_tokens=[[options.max_tokens]])
            tensors.update(exclude_input_in_output=[[True]], stream=[[options.stream]])
        else:
            tensors.update(INPUT_0=[[prompt]], INPUT_1=[[options.max_tokens]])
            tensors.update(
                INPUT_2=[[words_csv(options.bad_words)]], INPUT_3=[[words_csv(options.stop_words)]]
            )
        if model.kind == "text" and not as_tokens and {"stop_words", "bad_words"} <= set(model.inputs):
            # The text form takes the words as strings: stop words end the text (left out of it), as
            # OpenAI's `stop` does, and no round trip to the server's tokenizer is needed.
            for name, words in (("bad_words", options.bad_words), ("stop_words", options.stop_words)):
                if words:
                    tensors[name] = [list(words)]
        elif model.kind != "ensemble" or as_tokens:
            for name, words in (
                ("bad_words_list", options.bad_words),
                ("stop_words_list", options.stop_words),
            ):
                if words:
                    tensors[name] = word_list([self._tokens(w) for w in words])
        tensors.update(self._scalars(options))
        missing = [n for n in tensors if n not in model.inputs]
        if missing:
            raise ClientError(f"model '{model.name}' has no input {', '.join(missing)} for the options given")
        return {
            n: np.asarray(v, dtype=DATATYPES.get(model.inputs[n], np.object_)) for n, v in tensors.items()
        }

    @staticmethod
    def _scalars(options: Options) -> dict[str, list[list[Any]]]:
        if options.greedy and options.beam_width == 1:
            scalars: dict[str, Any] = {"runtime_top_k": 1}
        else:
            scalars = {"runtime_top_k": options.top_k or 0, "runtime_top_p": options.top_p or 0.0}
            if not options.top_k and not options.top_p:
                scalars["runtime_top_p"] = 1.0  # plain sampling: FT reads top-k 0 and top-p 0 as greedy
            if options.temperature is not None:
                scalars["temperature"] = options.temperature
        extra = {"repetition_penalty": options.repetition_penalty, "random_seed": options.seed}
        if options.beam_width > 1:
            extra["beam_width"] = options.beam_width
        scalars.update({k: v for k, v in extra.items() if v is not None})
        return {k: [[v]] for k, v in scalars.items()}

    # ------------------------------------------------------------------------------------ the answer
    def generate(self, index: int, prompt: Prompt, options: Options, on_text: OnText | None = None) -> Result:
        """One prompt as one request, streamed (`generate_stream`, `ModelStreamInfer`) when asked."""
        tensors = self.tensors(prompt, options)
        result = Result(index, prompt)
        start = time.perf_counter()
        responses = self._stream(tensors) if options.stream else iter([self._infer(tensors)])
        texts: list[str] = []
        for outputs in responses:
            latest = self._read(outputs, prompt, texts, options.stream, result)
            added = latest[0][len(texts[0]) if texts else 0 :] if latest else ""
            if added and isinstance(prompt, str) and self.interface.kind != "tokens" and options.stream:
                if result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - start
                if on_text is not None:
                    on_text(added)
            texts = latest
        result.latency_s = time.perf_counter() - start
        result.beams = texts
        result.text = texts[0] if texts else ""
        if result.num_tokens is None:  # FT's ensemble returns text only: count its tokens
            result.num_tokens = self._count_tokens(result.text)
        if result.num_tokens is not None:
            # Triton's outputs carry no finish reason: a full-length output hit the limit; a shorter one
            # ended on the end id or a stop word.
            result.finish_reason = "length" if result.num_tokens >= options.max_tokens else "stop"
        if (
            on_text is not None
            and result.text
            and (self.interface.kind == "tokens" or not isinstance(prompt, str))
        ):
            on_text(result.text)
        return result

    def _read(
        self,
        outputs: dict[str, np.ndarray],
        prompt: Prompt,
        texts: list[str],
        streaming: bool,
        result: Result,
    ) -> list[str]:
        """The beams' texts after one more response (a streamed text response holds only what each
        beam added; the other forms hold everything so far)."""
        kind = self.interface.kind if isinstance(prompt, str) else "tokens"
        if kind == "tokens":
            if "output_ids" not in outputs or "sequence_length" not in outputs:
                return texts
            lengths = np.asarray(outputs["sequence_length"]).reshape(-1)
            ids = np.asarray(outputs["output_ids"]).reshape(lengths.size, -1)
            beams = [ids[b, len(prompt) : int(lengths[b])].tolist() for b in range(lengths.size)]
            result.token_ids, result.num_tokens = beams[0], len(beams[0])
            return [" ".join(map(str, b)) for b in beams]
        name = "text_output" if kind == "text" else "OUTPUT_0"
        if name not in outputs:
            return texts
        if kind == "text" and "sequence_length" in outputs:  # exclude_input_in_output: generated only
            result.num_tokens = int(np.asarray(outputs["sequence_length"]).reshape(-1)[0])
        pieces = [_text(v) for v in np.asarray(outputs[name], dtype=np.object_).reshape(-1)]
        if kind == "ensemble" and isinstance(prompt, str):
            # FT's postprocessing decodes the whole row: the prompt, and the end-id padding after the text
            pieces = [p.split(END_OF_TEXT, 1)[0] for p in pieces]
            pieces = [p[len(prompt) :] if p.startswith(prompt) else p for p in pieces]
        if streaming and kind == "text":
            pieces = [(texts[i] if i < len(texts) else "") + p for i, p in enumerate(pieces)]
        return pieces

    def _infer(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.protocol == "http":
            body = {"inputs": [_json_tensor(n, a, self.interface.inputs[n]) for n, a in tensors.items()]}
            reply = self._http_json("POST", f"/v2/models/{self.model}/infer", body)
            return {o["name"]: _from_json(o) for o in reply.get("outputs", [])}
        result = self._grpc_call("infer", self.model, self._grpc_inputs(tensors))
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}

    def _stream(self, tensors: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        if self.protocol == "grpc":
            yield from self._grpc_stream(tensors)
            return
        body = {name: _generate_value(array) for name, array in tensors.items()}
        url = f"{self.url}/v2/models/{self.model}/generate_stream"
        try:
            with self.http.stream("POST", url, json=body) as response:
                check_response(response)
                for event in sse_events(response):
                    yield {k: np.asarray(v) for k, v in event.items() if k not in GENERATE_FIELDS}
        except httpx.TransportError as e:
            raise connect_error(self.url, e) from None

    def _grpc_inputs(self, tensors: dict[str, np.ndarray]) -> list:
        import tritonclient.grpc as grpcclient

        inputs = []
        for name, array in tensors.items():
            tensor = grpcclient.InferInput(name, list(array.shape), self.interface.inputs[name])
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def _grpc_stream(self, tensors: dict[str, np.ndarray]):
        from tritonclient.utils import InferenceServerException

        responses: queue.Queue = queue.Queue()
        client = self._grpc()
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            headers=self._grpc_headers())  # fmt: skip
        try:
            client.async_stream_infer(
                self.model, self._grpc_inputs(tensors), enable_empty_final_response=True
            )
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout)
                except queue.Empty:
                    raise ClientError(f"no response from {self.url} within {self.timeout:.0f} s") from None
                if error is not None:
                    raise ClientError(_grpc_message(error, self.url))
                response = result.get_response()
                yield {o.name: result.as_numpy(o.name) for o in response.outputs}
                final = response.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    return
        except InferenceServerException as e:
            raise ClientError(_grpc_message(e, self.url)) from None
        finally:
            client.stop_stream(cancel_requests=True)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _generate_value(array: np.ndarray) -> Any:
    """A tensor as a `generate` body value: one element as a scalar, more as nested lists."""
    if array.size == 1:
        value = array.reshape(-1)[0]
        return _text(value) if array.dtype == np.object_ else value.item()
    return array.tolist()


def _json_tensor(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    data = [_text(v) for v in array.reshape(-1)] if datatype == "BYTES" else array.reshape(-1).tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def _from_json(output: dict[str, Any]) -> np.ndarray:
    dtype = np.object_ if output["datatype"] == "BYTES" else DATATYPES.get(output["datatype"])
    return np.asarray(output["data"], dtype=dtype).reshape(output["shape"])


def _grpc_message(error: Exception, url: str) -> str:
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    if "StatusCode.UNAVAILABLE" in str(getattr(error, "status", lambda: "")()):
        return f"cannot reach the server at {url}: {message}"
    return message
