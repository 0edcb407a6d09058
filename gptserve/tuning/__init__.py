"""GEMM tuning for this machine (`gptserve tune`): the shapes a model runs and the file serve loads."""
