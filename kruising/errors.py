"""The one domain exception of kruising: expected failures a user can fix.

Every room raises it (or a subclass: ``pretrain.errors.PretrainError``,
``eval.errors.EvalError``); the CLIs catch it once (`kruising.console.run_cli`).
"""


class KruisingError(Exception):
    """An expected failure: bad recipe, missing model, shape mismatch, corrupt shard, no space.

    The CLI prints it as ``error: <message>`` then ``hint: <hint>`` and exits non-zero.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
