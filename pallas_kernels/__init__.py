"""Hand-written JAX/Pallas kernels for n3jax (imports only jax/numpy)."""
