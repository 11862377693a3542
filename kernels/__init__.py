"""Triton kernels of fastddpm (installed as ``fastddpm.kernels``)."""
