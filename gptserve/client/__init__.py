"""Clients of a running gptserve (or Triton) server: `gptserve client` and `gptserve chat` talk to it
through the adapters here, one per protocol (OpenAI HTTP, KServe v2 HTTP, KServe v2 gRPC)."""
