"""The domain exception of eval: expected failures a user can fix."""

from kruising.errors import KruisingError


class EvalError(KruisingError):
    """Malformed probe file, model without tokenizer, unknown suite: ``error:`` + ``hint:``."""
