"""e2ed2.kernels: Triton kernels, their autograd Functions and pure-torch references."""
