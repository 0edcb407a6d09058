"""GPU kernels in the Triton language, each beside the plain-PyTorch reference it is tested against.

Modules here import `triton` at the top, so they are imported only where a CUDA device runs the model
(the attention layer's CUDA branch, the CUDA graph runner, the GPU tests); the CPU path never loads them.
"""
