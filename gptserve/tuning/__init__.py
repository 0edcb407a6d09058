"""GEMM tuning for this machine (`gptserve tune`): the shapes a model runs, timed, and the tuning files
written beside the model (serve reads them through `gptserve.layers.tuning_file`)."""
