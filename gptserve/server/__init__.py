"""The OpenAI-compatible front-end: FastAPI routes over an `AsyncEngine` (`gptserve.frontend`); the app
that mounts it beside Triton's front-end is `gptserve.app`."""
