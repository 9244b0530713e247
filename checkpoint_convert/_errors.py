"""The converter's one error type (its own module so `_convert` and `_quantized` can both raise it)."""


class ConversionError(ValueError):
  """The checkpoint does not match its config or the key table."""
