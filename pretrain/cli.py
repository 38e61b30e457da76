"""`pretrain`: continue a Mistral checkpoint on a corpus; build the tiny family."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer

from kruising.cli import Command, Group

app = typer.Typer(
    name="pretrain",
    cls=Group,
    help="Continue a Mistral checkpoint on Dutch text, and build the tiny Mistral family.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

_state = {"verbose": False}


class Size(StrEnum):
    test = "test"
    default = "default"


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks.")) -> None:
    _state["verbose"] = verbose


@app.command(cls=Command)
def run(
    config: Path = typer.Argument(..., help="Pretrain config YAML (see recipes/pretrain/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    allow_config_change: bool = typer.Option(
        False,
        "--allow-config-change",
        help="Resume even though the config changes the training (lr, batch, sources, ...); "
        "the changes are recorded in metrics.jsonl and trainer_state.json.",
    ),
) -> None:
    """Train as CONFIG says: init_from a checkpoint (or a fresh model), or resume a run.

    Writes OUTPUT_DIR/model (a save_pretrained folder), OUTPUT_DIR/checkpoints/step-N,
    OUTPUT_DIR/metrics.jsonl and OUTPUT_DIR/loss.png. Under `accelerate launch` every process
    runs this same command. Resuming with a changed lr, schedule, batch, context, source or seed
    is an error naming the keys, unless --allow-config-change; a larger max_steps or max_tokens
    continues a finished run from its final checkpoint. Resuming a run that is already complete
    trains nothing, says so with its final loss, and exits 0 ("already_complete": true in --json).
    """
    from pretrain.config import load_config
    from pretrain.train import run as train_run

    result = train_run(load_config(config), allow_config_change=allow_config_change)
    if as_json and result.main_process:
        print(
            json.dumps(
                {
                    "model_dir": str(result.model_dir),
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "final_loss": result.final_loss,
                    "eval_loss": result.eval_loss,
                    "tokens_per_s": result.tokens_per_s,
                    "seconds": result.seconds,
                    "mfu": result.mfu,
                    "already_complete": result.already_complete,
                }
            )
        )


@app.command(cls=Command)
def family(
    out: Path = typer.Option(
        ..., "--out", help="Folder for the family (one subfolder per member)."
    ),
    size: Size = typer.Option(
        Size.default, "--size", help="test: about 1 min, default: a few min (2 idle CPU cores)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the world's corpora and the weights."),
    as_json: bool = typer.Option(False, "--json", help="Print family.json on stdout."),
) -> None:
    """Build the tiny Mistral family (base, nl, instruct) on the fact world; reuse it when current."""
    from pretrain.family import MARKER, build_family

    members = build_family(out, size=size.value, seed=seed)
    if as_json:
        print((out / MARKER).read_text())
    else:
        from kruising.console import console

        info = json.loads((out / MARKER).read_text())
        for name, ok in info["facts"]["checks"].items():
            console.print(f"{'ok ' if ok else 'NOT'} {name.replace('_', ' ')}")
        for name, path in members.items():
            console.print(f"{name}: {path}")


def main() -> None:
    from kruising.console import run_cli

    run_cli(app, lambda: _state["verbose"])


if __name__ == "__main__":
    main()
