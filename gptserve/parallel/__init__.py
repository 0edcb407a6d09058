"""Tensor parallelism: Megatron weight split, process group, parallel layers, multi-rank runtime."""
