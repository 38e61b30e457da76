"""The one domain exception of eval: expected failures a user can fix."""


class EvalError(Exception):
    """Malformed probe file, model without tokenizer, unknown suite: ``error:`` + ``hint:``."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
