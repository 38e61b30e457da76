"""What every room of kruising shares: one error type, the terminal, strict configs, Hub
references and offline handling, atomic writes, device resolution.

Importing it (or any of its modules) imports no torch and changes no process state; it
imports nothing from ``merger``, ``eval`` or ``pretrain``.
"""
