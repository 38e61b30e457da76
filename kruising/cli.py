"""typer command classes whose help reads right: a flag shows no value type.

typer 0.29 prints every option's type, so a flag reads ``--json <bool>`` (and ``--help
<bool>``) as if it took a value. These classes give flags an empty metavar before the help is
drawn; parsing is unchanged. Both CLIs (`merge`, `pretrain`) build their apps with them.
"""

from __future__ import annotations

from typer.core import TyperCommand, TyperGroup


def _flags_without_type(params: list) -> list:
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose flags (``--json``, ``--overwrite``, ``--help``) show no ``<bool>``."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))


class Group(TyperGroup):
    """The app itself (``--verbose -v``, ``--help``), same as `Command`."""

    def get_params(self, ctx):
        return _flags_without_type(super().get_params(ctx))
