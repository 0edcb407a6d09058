"""What the two front-ends (the OpenAI API in `server/`, Triton's KServe v2 in `triton/`) share: the
engine served to coroutines (`AsyncEngine`), request streams and admission, request logs, Prometheus
metrics, HTTP status errors and small HTTP helpers. Neither front-end imports the other."""
