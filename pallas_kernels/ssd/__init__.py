"""Mamba-2 SSD (state space duality) kernels and references."""
