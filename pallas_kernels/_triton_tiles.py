"""Triton tile rules shared by the kernel packages: dot operands need power-of-2 dimensions >= 16.

This module imports only jax.
"""

from jax.experimental import pallas as pl

MIN_TILE = 16


def is_tile(n: int) -> bool:
  """n is a power of 2 >= MIN_TILE."""
  return n >= MIN_TILE and n & (n - 1) == 0


def tile(n: int) -> int:
  """The smallest tile that holds n: a power of 2 >= MIN_TILE."""
  return max(MIN_TILE, pl.next_power_of_2(n))


def check_block_sizes(blocks, tiles: tuple[str, ...], counts: tuple[str, ...]) -> None:
  """Raises ValueError naming the first field of `blocks` that is not a tile (`tiles`) or not >= 1 (`counts`)."""
  for name in tiles:
    if not is_tile(getattr(blocks, name)):
      raise ValueError(f"{name}={getattr(blocks, name)} must be a power of 2 >= {MIN_TILE}")
  for name in counts:
    if getattr(blocks, name) < 1:
      raise ValueError(f"{name}={getattr(blocks, name)} must be >= 1")
