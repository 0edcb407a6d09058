"""OpenAI chat messages (pydantic) as the plain dicts a chat template renders."""

from __future__ import annotations

from typing import Any

from gptserve.server.errors import bad_request


def message_dicts(messages: list[Any]) -> list[dict[str, Any]]:
    """pydantic messages -> plain dicts for the template, with text parts joined into one string."""
    out = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or "text" not in part:
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad_request(
                        f"content part of type {kind!r} is not supported (text only)",
                        f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            item["content"] = "\n".join(texts)
        elif content is None:
            item["content"] = ""
        out.append(item)
    return out
