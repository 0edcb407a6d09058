"""Tensor parallelism's floor: the process group and its collectives, the Megatron weight split and the
channel of rank 0's step messages (the parallel layers are in `gptserve.layers`)."""
