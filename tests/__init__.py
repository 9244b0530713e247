"""n3jax tests."""
