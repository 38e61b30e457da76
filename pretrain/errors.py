"""The one domain exception of pretrain: expected failures a user can fix."""


class PretrainError(Exception):
    """Bad config, missing corpus, corrupt checkpoint: printed as ``error:`` + ``hint:``."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
