"""GPU kernels in the Triton language, each beside the plain-PyTorch reference it is tested against.

Kernel modules import `triton` at the top, so they are imported only where a CUDA device runs the model
(the attention layer's CUDA branch, the CUDA graph runner, the GPU tests); the CPU path never loads them.
Two modules are plain Python for any machine: the launch configurations (`matmul_configs`), which a
tuning report names, and the int8 weight format (`int8_weights`), which a converter writes.
"""
