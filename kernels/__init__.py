"""Pure Triton: @triton.jit kernels and launchers that take tensors and
return tensors. No autograd, no argument parsing (that is segops.ops).
Installed as ``segops.kernels``."""
