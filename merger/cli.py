"""`merge`: the workbench's command line. It parses and reports; the work lives elsewhere.

Nothing heavy (torch, transformers, mergekit) is imported here at start-up: each command
imports what it needs inside its body, so `merge --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kruising.cli import Command, Group

app = typer.Typer(
    name="merge",
    cls=Group,
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


@app.command("run", cls=Command)
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
    seed: Annotated[int, typer.Option(help="Seed of the random methods (dare_*).")] = 0,
    lora_merge_cache: Annotated[
        Path | None,
        typer.Option(
            help="Keep each model+lora input merged in this folder, reused by later runs "
            "(mergekit's --lora-merge-cache). Default: the adapter is applied as tensors are read."
        ),
    ] = None,
    compute_dtype: Annotated[
        str | None,
        typer.Option(
            help="float32: compute in float32 instead of the recipe's dtype (mergekit's "
            "default); recorded in the provenance and model card."
        ),
    ] = None,
    intermediate_dir: Annotated[
        Path | None,
        typer.Option(
            "--intermediate-dir",
            "-I",
            help="Multi-document recipes (mergekit-multimerge): where each named stage's child "
            "goes (reused when complete). Default: OUT.stages next to --out.",
        ),
    ] = None,
    lora_merge_dtype: Annotated[
        str | None,
        typer.Option(
            help="mergekit's --lora-merge-dtype: a model+lora input's model is cast to this "
            "dtype before its adapter is added. Default: its stored dtype."
        ),
    ] = None,
    copy_tokenizer: Annotated[
        bool,
        typer.Option(
            help="Copy the donor's tokenizer into the child (mergekit's --copy-tokenizer); a "
            "tokenizer the recipe builds is written either way."
        ),
    ] = True,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            help="--engine mergekit: let mergekit run the inputs' own model code "
            "(the native engine runs none)."
        ),
    ] = False,
    allow_crimes: Annotated[
        bool,
        typer.Option(help="--engine mergekit: let mergekit mix architectures."),
    ] = False,
    mergekit_option: Annotated[
        list[str] | None,
        typer.Option(
            "--mergekit-option",
            help="--engine mergekit: any other field of mergekit's MergeOptions, KEY=VALUE "
            "(repeatable), e.g. clone_tensors=true.",
        ),
    ] = None,
) -> None:
    """Merge the models of RECIPE into a child checkpoint folder.

    The child is built in a temporary sibling and renamed into place when complete. A
    RECIPE of several YAML documents runs its named stages in order, then the unnamed one.
    With --engine mergekit the recipe goes to mergekit as written: what our parser would
    refuse is a warning (file:line), what mergekit refuses an error, before any work.
    """
    from merger.core.multidoc import check_recipe_file

    if engine != "mergekit":  # a bad recipe fails before torch is imported (well under a second)
        check_recipe_file(recipe)
    from merger.core.engine import run_recipe_file
    from merger.core.mergekit_engine import split_option
    from merger.core.options import MergeOptions

    options = MergeOptions(
        device=device,
        out_shard_size=out_shard_size,
        engine=engine,
        allow_pickle=allow_pickle,
        overwrite=overwrite,
        seed=seed,
        lora_merge_cache=str(lora_merge_cache) if lora_merge_cache else None,
        compute_dtype=compute_dtype,
        lora_merge_dtype=lora_merge_dtype,
        copy_tokenizer=copy_tokenizer,
        trust_remote_code=trust_remote_code,
        allow_crimes=allow_crimes,
        mergekit_options=tuple(split_option(o) for o in mergekit_option or ()),
    )
    run_recipe_file(recipe, out, options, intermediate_dir=intermediate_dir)


@app.command("moe", cls=Command)
def moe_command(
    recipe: Annotated[Path, typer.Argument(help="A mergekit-moe YAML recipe.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Child folder to write.")],
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N: where the hidden gate mode runs.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of random gates and noise_scale.")] = 0,
    allow_all_same: Annotated[
        bool, typer.Option(help="Allow every expert to be the same model (to train it further).")
    ] = False,
    out_shard_size: Annotated[str, typer.Option(help="Largest output shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing child folder.")] = False,
) -> None:
    """Build a Mixtral-style mixture of experts from Mistral fine-tunes (mergekit-moe's YAML).

    The base model gives attention, embeddings and norms; each expert its MLPs; the router
    comes from the gate mode (hidden, cheap_embed, random, ...), as mergekit-moe makes it.
    """
    from merger.core.moe import build_moe, load_moe_recipe

    parsed, text = load_moe_recipe(recipe)
    build_moe(
        parsed,
        out,
        recipe_text=text,
        device=device,
        seed=seed,
        allow_all_same=allow_all_same,
        overwrite=overwrite,
        out_shard_size=out_shard_size,
    )


@app.command("extract-lora", cls=Command)
def extract_lora_command(
    model: Annotated[str, typer.Option("--model", help="The fine-tuned model (folder or Hub id).")],
    base: Annotated[str, typer.Option("--base", help="The model it was fine-tuned from.")],
    rank: Annotated[int, typer.Option("--rank", help="Largest LoRA rank per module.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter folder to write.")],
    distribute_scale: Annotated[
        bool, typer.Option(help="Split the singular values as sqrt(S) over A and B.")
    ] = True,
    sv_epsilon: Annotated[float, typer.Option(help="Drop singular values at or below this.")] = 0.0,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N: where the SVDs run.")
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing adapter folder.")] = False,
) -> None:
    """Extract MODEL's task vector over BASE as a PEFT LoRA adapter (truncated SVD per
    linear module, as mergekit-extract-lora); embeddings, head and norms at full rank."""
    from merger.core.lora import extract_lora

    extract_lora(
        model,
        base,
        rank,
        out,
        distribute_scale=distribute_scale,
        sv_epsilon=sv_epsilon,
        device=device,
        overwrite=overwrite,
    )


@app.command("push", cls=Command)
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
    from merger.share.hub import push

    url = push(child, repo, private=private, recipe_only=recipe_only)
    print(url)


@app.command("pull", cls=Command)
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
    from merger.share.hub import pull

    pull(source, out, overwrite=force)


@app.command("sweep", cls=Command)
def sweep_command(
    spec: Annotated[Path, typer.Argument(help="A sweep spec YAML (recipe + search space).")],
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL; default the spec's, else sqlite:///kruising-studies.db."
        ),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(help="Variants the study should hold (overrides the spec).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[
        int,
        typer.Option(
            help="Start this many worker processes on the study (one GPU each when there are "
            "GPUs, round-robin). Workers on other machines join with the same command and "
            "--storage."
        ),
    ] = 1,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the leaderboard as JSON on stdout.")
    ] = False,
) -> None:
    """Merge variants of a recipe in memory, score each, and rank them in an optuna study.

    Rerunning a killed sweep continues it; completed variants are kept. Any number of these
    commands may run at once on one study (--storage): each variant is merged once, and a
    dead worker's variant is taken over by another after the heartbeat's grace period.
    """
    import json

    from kruising.errors import KruisingError
    from merger.study.rank import leaderboard, load_study, print_leaderboard
    from merger.study.spec import load_spec, spec_recipe
    from merger.study.sweep import run_sweep

    parsed, root = load_spec(spec)
    if trials is not None and trials < 1:
        raise KruisingError(f"--trials must be at least 1, got {trials}", "use --trials 8")
    if workers < 1:
        raise KruisingError(f"--workers must be at least 1, got {workers}", "use --workers 2")
    if workers > 1:
        from merger.study.workers import start_workers

        if parsed.mode == "streaming":
            raise KruisingError(
                "--workers needs mode: resident (a streaming sweep is one worker per study)",
                "drop --workers, or use mode: resident",
            )
        if device.startswith("cuda:"):
            raise KruisingError(
                f"--workers with --device {device}: each worker gets its own GPU",
                "use --device auto or cuda (workers see one GPU each via CUDA_VISIBLE_DEVICES)",
            )
        args = [str(spec), "--device", device]
        args += ["--storage", storage] if storage else []
        args += ["--trials", str(trials)] if trials else []
        start_workers(workers, args, use_gpus=device != "cpu")
        study = load_study(parsed.name, storage or parsed.storage)
    else:
        study = run_sweep(
            parsed, spec_recipe(parsed, root), storage=storage, trials=trials, device=device
        )
    board = leaderboard(study)
    print_leaderboard(board, limit=10)
    if json_out:
        print(json.dumps(board, indent=2))


@app.command("rank", cls=Command)
def rank_command(
    study: Annotated[str, typer.Argument(help="The study name (a sweep spec's name:).")],
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default sqlite:///kruising-studies.db).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the leaderboard as JSON on stdout.")
    ] = False,
    plots: Annotated[
        Path | None, typer.Option(help="Write PNG plots (score vs parameter, Pareto) here.")
    ] = None,
    top: Annotated[int | None, typer.Option(help="Show only the best N rows.")] = None,
    stability: Annotated[
        bool,
        typer.Option(
            "--stability",
            help="Also say how stable the ranking is: Kendall tau between the rankings on two "
            "random halves of the items.",
        ),
    ] = False,
) -> None:
    """Show a study's leaderboard: rank, parameters, Dutch and English scores ± standard error,
    whether each row really differs from the one above, Pareto mark."""
    import json

    from kruising.console import console
    from merger.study.rank import leaderboard, load_study, print_leaderboard, write_plots

    board = leaderboard(load_study(study, storage), stability=stability)
    print_leaderboard(board, limit=top)
    if plots is not None:
        for plot in write_plots(board, plots):
            console.print(f"wrote {plot['path']}")
    if json_out:
        print(json.dumps(board, indent=2))


@app.command("export", cls=Command)
def export_command(
    study: Annotated[str, typer.Argument(help="The study name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Recipe file to write.")],
    rank: Annotated[int, typer.Option(help="Which variant: 1 is the best.")] = 1,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default sqlite:///kruising-studies.db).")
    ] = None,
) -> None:
    """Write the variant at RANK of a study as a normal recipe (for `merge run`)."""
    from kruising.console import console
    from merger.study.rank import export, leaderboard, load_study

    path = export(leaderboard(load_study(study, storage)), rank, out)
    console.print(f"wrote {path}")


@app.command("demo", cls=Command)
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder to write.")] = Path(
        "kruising-demo"
    ),
    family: Annotated[
        Path | None,
        typer.Option(help="Tiny family folder (built there once, reused after)."),
    ] = None,
    size: Annotated[
        str, typer.Option(help="Family size: default (the demo) or test (seconds, for tests).")
    ] = "default",
    trials: Annotated[
        int | None, typer.Option(help="Sweep variants (default: the demo sweep's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON on stdout.")
    ] = False,
) -> None:
    """The main job: tiny Dutch/chat Mistral family -> demo merges -> sweep -> ranked report.

    States whether the best child beats both parents on Dutch questions in chat form.
    """
    import json

    from merger.demo import run_demo

    summary = run_demo(
        out, family_dir=family, size=size, trials=trials, device=device, overwrite=overwrite
    )
    if json_out:
        print(json.dumps(summary, indent=2, default=str))


@app.command("eval", cls=Command)
def eval_command(
    models: Annotated[list[str], typer.Argument(help="Checkpoint folders or Hub ids.")],
    suite: Annotated[
        str, typer.Option(help="nl, en, demo, all (nl + en), or a folder of *.jsonl probe files.")
    ] = "nl",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write OUT/<model>/scorecard.json (default: no files; the table on stderr, "
            "--json on stdout)."
        ),
    ] = None,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the scorecards as JSON on stdout.")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 16,
    lm_eval: Annotated[
        str | None,
        typer.Option(
            "--lm-eval",
            help="Also run lm-evaluation-harness tasks, comma-separated (needs the lm-eval extra).",
        ),
    ] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help="Items per lm-eval task (default: all).")
    ] = None,
) -> None:
    """Score MODELS on Dutch probes; with --out, write a scorecard per model.

    Scores are log-likelihood multiple choice (acc, acc_norm), minimal pairs, greedy continuations
    checked by a language identifier, and held-out perplexity; dutch_score and english_score are
    weighted means (see eval/probes/README.md).
    """
    import json

    from eval.report import score_models
    from kruising.console import console
    from merger.share.card import refresh_child_card

    cards, written = score_models(
        models,
        suite,
        out,
        device=device,
        batch_size=batch_size,
        lm_eval=lm_eval,
        lm_eval_limit=lm_eval_limit,
    )
    for ref, card, path in zip(models, cards, written, strict=True) if out is not None else ():
        readme = refresh_child_card(Path(ref), card, path)
        if readme is not None:
            console.print(f"refreshed the model card {readme} with these scores")
    if json_:
        payload = cards[0] if len(cards) == 1 else cards
        print(json.dumps(payload, indent=2, ensure_ascii=False))


def main() -> None:
    from kruising.console import run_cli

    run_cli(app, lambda: _state["verbose"])


def entry() -> None:
    """The console script: `main`, then the interpreter's normal exit.

    Large CPU tensors go on transparent huge pages: the torch reference path and the in-memory
    (sweep) merges allocate a fresh output per tensor, and faulting those in 4 KiB at a time
    costs more kernel time than the merge math. torch reads the switch when it is first
    imported, so it is set here, in the process entry, before any command imports torch (a
    library user of the merger sets it, or not, in their own process).

    When the command is done, the objects alive then (torch's and transformers' modules, most
    of them) are frozen out of the garbage collector (`gc.freeze`): the exit still runs atexit
    handlers, flushes and tears the modules down, but its final collections do not walk that
    whole graph again, which was most of the exit's time (bench/exit_cost.py).
    """
    import gc
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":
    entry()
