"""`merge`: the workbench's command line. It parses and reports; the work lives elsewhere.

Nothing heavy (torch, transformers, mergekit) is imported here at start-up: each command
imports what it needs inside its body, so `merge --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from eval.cli import eval_command

app = typer.Typer(
    name="merge",
    help="kruising: merge Mistral-family models with mergekit recipes, probe them in Dutch, rank and share.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

_state = {"verbose": False}


@app.callback()
def _root(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks for expected errors.")
    ] = False,
) -> None:
    _state["verbose"] = verbose


@app.command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="A mergekit YAML recipe.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Child folder to write.")],
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks cuda:0 when there is a GPU.")
    ] = "auto",
    out_shard_size: Annotated[
        str, typer.Option(help="Largest output shard, e.g. 5GB, 500MB.")
    ] = "5GB",
    engine: Annotated[
        str, typer.Option(help="native (ours) or mergekit (hand the recipe to mergekit's API).")
    ] = "native",
    allow_pickle: Annotated[
        bool, typer.Option(help="Accept .bin/.pt checkpoints (loaded with weights_only=True).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing child folder.")] = False,
) -> None:
    """Merge the models of RECIPE into a child checkpoint folder."""
    from merger.engine import run_recipe_file

    run_recipe_file(
        recipe,
        out,
        device=device,
        out_shard_size=out_shard_size,
        engine=engine,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
    )


@app.command("push")
def push_command(
    child: Annotated[Path, typer.Argument(help="Child folder written by `merge run`.")],
    repo: Annotated[str, typer.Option("--repo", help="Model repo on the Hub: ORG/NAME.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
    recipe_only: Annotated[
        bool, typer.Option(help="Upload only README.md, mergekit_config.yml and the scorecard.")
    ] = False,
) -> None:
    """Upload CHILD (card with scores, recipe, weights) to a Hub model repo in one commit.

    The token comes from HF_TOKEN or `hf auth login`; it is never written anywhere.
    """
    from merger.hub import push

    url = push(child, repo, private=private, recipe_only=recipe_only)
    print(url)


@app.command("pull")
def pull_command(
    source: Annotated[str, typer.Argument(help="Hub model repo ORG/NAME[@rev] or a local folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Recipe file to write.")] = Path(
        "recipe.yaml"
    ),
    force: Annotated[bool, typer.Option(help="Replace an existing, different --out file.")] = False,
) -> None:
    """Write the recipe of a Hub repo or folder, validated, for `merge run` to reproduce it.

    Reads mergekit_config.yml, else the recipe YAML block of README.md (mergekit, LazyMergekit).
    """
    from merger.hub import pull

    pull(source, out, overwrite=force)


app.command("eval")(eval_command)


def main() -> None:
    from merger.console import run_cli

    run_cli(app, lambda: _state["verbose"])


if __name__ == "__main__":
    main()
