"""`gptserve chat`: a terminal conversation with a model, answers streamed as they are generated.

Without `--url` the model (MODEL, or the embedded default) is loaded and served inside this process;
with `--url` the chat goes to a running server's `/v1/chat/completions`. The conversation is kept and
sent with every turn. Ctrl-C stops the answer being written (the request is cancelled on the server;
what was written stays in the conversation); at the prompt it only clears the line. Ctrl-D or `/exit`
ends the chat.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

HELP = """commands:
  /system TEXT   set the system prompt (without TEXT: remove it)
  /reset         forget the conversation (the system prompt stays)
  /history       show the conversation
  /help          this list
  /exit          quit (or Ctrl-D); Ctrl-C stops an answer"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gptserve.cli import HelpWithListsFormatter, add_engine_args

    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (a local model, or a server with --url)",
        description="Chat in the terminal with MODEL (default: the embedded model) or a server (--url); "
        "answers stream as they are generated.",
        epilog="In the chat, " + HELP,
        formatter_class=HelpWithListsFormatter,
    )
    add_engine_args(p)
    p.add_argument("--url", help="chat with the server at this address instead of loading a model")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $GPTSERVE_API_KEY)")
    p.add_argument("--model-name", help="with --url: the model to ask (default: the server's first)")
    p.add_argument("--chat-template", default=None, help="jinja2 chat template file overriding the model's")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; 0 = greedy (default: the model's)",
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's)")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="sample among the K likeliest (default: the model's)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="divide the scores of tokens already seen by this (default: the model's)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: none, answers vary)")


class ChatSession:
    """The conversation and its commands; `answer` streams one reply."""

    def __init__(self, client, options, system: str | None, out=sys.stdout):
        self.client = client
        self.options = options
        self.system = system
        self.history: list[dict[str, str]] = []
        self.out = out

    def messages(self) -> list[dict[str, str]]:
        """What the model is sent: the system prompt, then the conversation."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            self._say("(conversation cleared)")
        elif name == "/system":
            self.system = rest.strip() or None
            self._say(f"(system prompt: {self.system})" if self.system else "(system prompt removed)")
        elif name == "/history":
            for m in self.messages():
                self._say(f"{m['role']}: {m['content']}")
            if not self.messages():
                self._say("(empty)")
        elif name == "/help":
            self._say(HELP)
        else:
            self._say(f"unknown command {name}; /help lists them")
        return True

    def answer(self, text: str) -> None:
        """Send the user's `text` and stream the reply; Ctrl-C stops it, a server error is shown."""
        from gptserve.client.types import ClientError

        self.history.append({"role": "user", "content": text})
        reply = ""
        pieces = self.client.stream_chat(self.messages(), self.options)
        try:
            for piece in pieces:
                reply += piece
                self.out.write(piece)
                self.out.flush()
            self.out.write("\n")
        except KeyboardInterrupt:
            pieces.close()  # closes the connection: the server cancels the request
            self.out.write(" [stopped]\n")
        except ClientError as e:
            self.out.write("\n" if reply else "")
            print(f"error: {e}", file=sys.stderr, flush=True)
        finally:
            pieces.close()
        if reply:
            self.history.append({"role": "assistant", "content": reply})
        else:
            self.history.pop()  # nothing came back: the turn did not happen
        self.out.flush()

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _loop(session: ChatSession) -> None:
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return
            continue
        session.answer(line)


def run(args: argparse.Namespace) -> int:
    from gptserve.client.local_server import LocalServer
    from gptserve.client.openai_client import OpenAIClient
    from gptserve.client.types import Options
    from gptserve.errors import GptServeError

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.url and args.model:
        raise GptServeError("give MODEL or --url, not both")
    if args.model_name and not args.url:
        raise GptServeError("--model-name is for --url (a local model is served under its own name)")
    from gptserve.cli import sampling_params_from_flags

    # The flags are checked before anything loads or connects (the server would refuse them later).
    sampling_params_from_flags(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )  # fmt: skip
    api_key = args.api_key or os.environ.get("GPTSERVE_API_KEY") or None
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            from gptserve.cli import engine_options

            url = stack.enter_context(LocalServer(args.model, engine_options(args), args.chat_template)).url
            api_key = None
        client = OpenAIClient(url, api_key, args.model_name)
        stack.callback(client.close)
        defaults = _model_defaults(client)
        options = Options(
            max_tokens=args.max_tokens,
            temperature=_flag_or(args.temperature, defaults, "temperature", 0.7),
            top_p=_flag_or(args.top_p, defaults, "top_p", None),
            top_k=_flag_or(args.top_k, defaults, "top_k", None),
            repetition_penalty=_flag_or(args.repetition_penalty, defaults, "repetition_penalty", None),
            seed=args.seed,
        )
        where = f" at {args.url}" if args.url else ""
        print(f"Chatting with {client.model}{where}. /help lists commands; Ctrl-C stops an answer, "
              "Ctrl-D quits.", flush=True)  # fmt: skip
        sampling = ", ".join(
            f"{name} {getattr(options, name)}"
            for name in ("temperature", "top_p", "top_k", "repetition_penalty")
            if getattr(options, name) is not None
        )
        source = f" (defaults from {defaults['source']})" if "source" in defaults else ""
        print(f"Sampling with {sampling}{source}.", flush=True)
        _loop(ChatSession(client, options, args.system))
    return 0


def _model_defaults(client) -> dict:
    """The served model's default sampling values (its `/v1/models` entry), or {} from a server that
    does not report them."""
    response = client.http.get(f"/models/{client.model}")
    if response.status_code != 200:
        return {}
    defaults = response.json().get("sampling_defaults")
    return defaults if isinstance(defaults, dict) else {}


def _flag_or(flag, defaults: dict, name: str, fallback):
    """The flag's value if given, else the model's default, else `fallback` (a server without defaults)."""
    if flag is not None:
        return flag
    return defaults.get(name, fallback)
