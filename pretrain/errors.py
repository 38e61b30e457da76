"""The domain exception of pretrain: expected failures a user can fix."""

from kruising.errors import KruisingError


class PretrainError(KruisingError):
    """Bad config, missing corpus, corrupt checkpoint: printed as ``error:`` + ``hint:``."""
