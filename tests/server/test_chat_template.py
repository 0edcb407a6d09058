"""Chat templates render in a sandbox; bad templates and bad messages are clear 400s, not 500s."""

from __future__ import annotations

import pytest

from gptserve.engine.chat_template import ChatTemplate, load_template_source
from gptserve.errors import GptServeError, InvalidRequestError
from gptserve.frontend.api_error import APIError
from gptserve.server.chat_messages import message_dicts
from gptserve.server.openai_protocol import ChatMessage

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_and_generation_prompt() -> None:
    t = ChatTemplate(CHATML)
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(msgs, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"
    cont = t.render([*msgs, {"role": "assistant", "content": "Hel"}], False, continue_final_message=True)
    assert cont.endswith("<|im_start|>assistant\nHel")


def test_special_tokens_and_tojson() -> None:
    t = ChatTemplate("{{ bos_token }}{{ messages | tojson }}", {"bos_token": "<s>", "eos_token": None})
    assert t.render([{"role": "user", "content": "é"}]) == '<s>[{"role": "user", "content": "é"}]'


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # reaching Python internals
        "{% set _ = messages.append({'role': 'x'}) %}",  # mutating the input
        "{{ raise_exception('roles must alternate') }}",
    ],
)
def test_sandbox_refusals_are_400(source: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
    assert e.value.http_status == 400 and e.value.param == "messages"


def test_missing_template_is_a_clear_400() -> None:
    with pytest.raises(InvalidRequestError) as e:
        ChatTemplate(None).render([{"role": "user", "content": "hi"}])
    assert e.value.http_status == 400 and "--chat-template" in str(e.value)


def test_template_sources(tmp_path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text(CHATML)
    assert load_template_source(str(f), "model's") == CHATML
    assert load_template_source(None, "model's") == "model's"
    assert load_template_source(None, {"default": "d", "tool_use": "t"}) == "d"
    assert load_template_source(None, None) is None
    with pytest.raises(GptServeError, match="no such file"):
        load_template_source(str(tmp_path / "missing.jinja"), None)
    with pytest.raises(GptServeError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_message_parts() -> None:
    parts = ChatMessage.model_validate(
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    )
    assert message_dicts([parts]) == [{"role": "user", "content": "a\nb"}]
    image = ChatMessage.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {}}]})
    with pytest.raises(APIError) as e:
        message_dicts([image])
    assert e.value.param == "messages[0].content[0]"
