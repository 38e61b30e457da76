"""Multi-document recipes (mergekit-multimerge): stages merged in order, each into a folder.

A file of several YAML documents is mergekit-multimerge's: every document is a recipe with a
``name``, except at most one unnamed one, the final merge (written to ``--out``). A model
reference whose path is a stage's name means that stage's child; it is
``INTERMEDIATE_DIR/<name>`` (revision and ``+lora`` kept), as mergekit patches it. Stages run in
dependency order (ties in file order); a cycle, a duplicate name or a second unnamed document
is an error. Without an unnamed document the last stage is the one written to ``--out``
(mergekit then writes it into the intermediate folder; there is no --out to leave empty).

Every stage is parsed, opened and planned before the first is merged: a stage that reads an
earlier one is planned against what that one will be (its planned tensors, its config and
tokenizer written to a scratch folder), so a bad later stage stops the run before any tensor
is written. An intermediate is reused when it is complete (mergekit's test: ``config.json``
and weights), holds the same stage recipe (its ``mergekit_config.yml``) and no stage it
reads was merged again in this run; otherwise it is merged again (mergekit would reuse a
stale one).

Only model-reference fields are patched (``model``, ``base_model``, ``tokenizer_source``,
tokenizer ``source``); mergekit tries every string of the recipe, which differs only for a
stage named like a parameter or method.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kruising.console import console
from kruising.errors import KruisingError
from merger.core.recipe import MergeRecipe, parse_recipe, recipe_to_yaml, validate_recipe

if TYPE_CHECKING:
    from merger.core.io import ModelSource

#: mergekit's test that an intermediate is complete (multimerge.MODEL_CHECK_FILENAMES)
MODEL_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_REF_KEYS = ("model", "base_model", "tokenizer_source", "source")


@dataclass
class Stage:
    name: str | None  # None: the final, unnamed merge
    recipe: MergeRecipe
    text: str  # the patched recipe as YAML: what the stage's child keeps as mergekit_config.yml
    out: Path
    needs: list[str] = field(default_factory=list)


def split_documents(text: str) -> list[tuple[int, str]] | None:
    """``(first line, text padded to keep line numbers)`` per YAML document; None for one."""
    import yaml

    starts, ends = [], []
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.DocumentStartEvent):
                starts.append(event.start_mark.line)
            elif isinstance(event, yaml.DocumentEndEvent):
                ends.append(event.end_mark.line + (1 if event.explicit else 0))
    except yaml.YAMLError:
        return None  # parse_recipe reports it with its line
    if len(starts) < 2:
        return None
    lines = text.splitlines(keepends=True)
    docs = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(lines)
        body = "".join(lines[start:end])
        body = re.sub(r"\A---[ \t]*\n?", "\n", body)  # the marker line stays a (blank) line
        body = re.sub(r"^\.\.\.[ \t]*$", "", body, flags=re.M)
        first = next(
            (j for j in range(start, end) if lines[j].strip() and lines[j].strip() != "---"),
            start,
        )
        docs.append((first + 1, "\n" * start + body))
    return docs


def is_multi_document(text: str) -> bool:
    return split_documents(text) is not None


def default_intermediate_dir(out: Path) -> Path:
    """Next to the child: ``<out>.stages`` (mergekit-multimerge asks for -I every time)."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + ".stages")


def parse_documents(text: str, source: str) -> list[tuple[int, MergeRecipe]]:
    """Every document parsed; the problems of all documents reported together."""
    from merger.core.recipe import RecipeError

    docs = split_documents(text)
    if docs is None:
        raise KruisingError(f"{source} is a single recipe", "run it as one")
    recipes: list[tuple[int, MergeRecipe]] = []
    problems: list = []
    for line, body in docs:
        try:
            recipes.append((line, parse_recipe(body, source)))
        except RecipeError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RecipeError(problems)
    return recipes


def check_recipe_file(path: Path) -> None:
    """`merge run`'s quick check before torch is imported: one recipe or several documents."""
    from merger.core.recipe import load_recipe

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None  # load_recipe says what is wrong
    if text is not None and is_multi_document(text):
        parse_documents(text, str(path))
    else:
        load_recipe(path)


def load_stages(text: str, source: str, out: Path, intermediate_dir: Path) -> list[Stage]:
    """Every document parsed (all problems of all documents together), patched and ordered."""
    recipes = parse_documents(text, source)
    names: dict[str | None, int] = {}
    for line, recipe in recipes:
        if recipe.name in names:
            what = "a second unnamed document" if recipe.name is None else f"name {recipe.name!r}"
            raise KruisingError(
                f"{source}:{line}: {what} (the first at line {names[recipe.name]})",
                "give every stage its own name; only the final merge has none",
            )
        names[recipe.name] = line
    named = {n for n in names if n is not None}
    final = None if None in names else recipes[-1][1].name
    stages: dict[str | None, Stage] = {}
    for _, recipe in recipes:
        data = recipe.model_dump(mode="json", exclude_none=True)
        data.pop("name", None)
        needs: list[str] = []
        data = _patch(data, named, intermediate_dir, needs)
        patched = validate_recipe(data, source)
        where = out if recipe.name == final else Path(intermediate_dir) / str(recipe.name)
        stages[recipe.name] = Stage(
            recipe.name, patched, recipe_to_yaml(patched), where, list(dict.fromkeys(needs))
        )
    if final is not None:
        readers = [s.name for s in stages.values() if final in s.needs]
        if readers:
            raise KruisingError(
                f"{source}: stage {readers[0]!r} reads {final!r}, the last document, which is "
                "the one written to --out",
                "add a final merge without a name (mergekit-multimerge's output)",
            )
    return _ordered(stages, source)


def _patch(node: Any, names: set[str], folder: Path, used: list[str], key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _patch(v, names, folder, used, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_patch(v, names, folder, used, key) for v in node]
    if isinstance(node, str) and key in _REF_KEYS:
        model, plus, lora = node.partition("+")
        path, at, revision = model.partition("@")
        if path in names:
            used.append(path)
            return str(Path(folder) / path) + at + revision + plus + lora
    return node


def _ordered(stages: dict[str | None, Stage], source: str) -> list[Stage]:
    order: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = " -> ".join([*path[path.index(str(name)) :], str(name)])
            raise KruisingError(
                f"{source}: the stages read each other in a circle: {cycle}",
                "a stage can use only stages that do not use it",
            )
        state[name] = "open"
        for need in stages[name].needs:
            visit(need, [*path, str(name)])
        state[name] = "done"
        order.append(stages[name])

    for name in stages:
        visit(name, [])
    return order


def is_complete(folder: Path) -> bool:
    """mergekit-multimerge's test: config.json and a weights file or index."""
    return (folder / "config.json").is_file() and any((folder / f).exists() for f in MODEL_FILES)


def _planned_source(ref: str, plan, scratch: Path) -> ModelSource:
    """What a stage's child will be, for planning the stages that read it: its tensors as
    planned, its config and tokenizer written to ``scratch``."""
    import json

    import torch

    from merger.core.child import write_config, write_tokenizer
    from merger.core.io import ModelSource, TensorInfo

    scratch.mkdir(parents=True, exist_ok=True)
    write_config(plan, scratch)
    write_tokenizer(plan, scratch)
    config = json.loads((scratch / "config.json").read_text())
    tensors = {}
    for task in plan.tasks:
        n = 1
        for d in task.shape:
            n *= d
        nbytes = n * torch.empty((), dtype=task.out_dtype).element_size()
        tensors[task.name] = TensorInfo(scratch / "planned", task.out_dtype, task.shape, 0, nbytes)
    return ModelSource(ref, scratch, config, tensors)


def plan_stages(stages: list[Stage], options) -> set[str]:
    """Plan every stage (against planned or reused intermediates); the stage names to merge."""
    from merger.core.child import check_chat_template
    from merger.core.plan import build_plan

    planned: dict[str, ModelSource] = {}
    to_merge: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="kruising-stages-") as scratch:
        for stage in stages:
            label = stage.name or "final merge"
            reused = (
                stage.name is not None
                and is_complete(stage.out)
                and not (set(stage.needs) & to_merge)
            )
            if reused:
                kept = stage.out / "mergekit_config.yml"
                if not kept.is_file() or kept.read_text() != stage.text:
                    console.print(f"stage {label}: {stage.out} holds another recipe: merged again")
                    reused = False
            virtual = {
                ref: planned[ref] for ref in stage.recipe.referenced_models() if ref in planned
            }
            try:
                sources = _open_except(stage.recipe, virtual, options)
                try:
                    plan = build_plan(stage.recipe, sources)
                    check_chat_template(stage.recipe.chat_template)
                    if stage.name is not None and not reused:
                        ref = str(stage.out)
                        planned[ref] = _planned_source(ref, plan, Path(scratch) / stage.name)
                finally:
                    for ref, source in sources.items():
                        if ref not in virtual:
                            source.close()
            except KruisingError as exc:
                raise KruisingError(f"stage {label}: {exc.message}", exc.hint) from None
            if not reused:
                to_merge.add(str(stage.name))
            console.print(f"stage {label}: {'reused' if reused else 'planned'} ({stage.out})")
    return to_merge


def _open_except(recipe: MergeRecipe, virtual: dict[str, ModelSource], options):
    from merger.core.adapter import open_lora_input
    from merger.core.io import open_model

    sources = {}
    for ref in recipe.referenced_models():
        if ref in virtual:
            sources[ref] = virtual[ref]
        elif "+" in ref:
            cache = Path(options.lora_merge_cache) if options.lora_merge_cache else None
            sources[ref] = open_lora_input(
                ref,
                allow_pickle=options.allow_pickle,
                cache=cache,
                dtype=getattr(options, "lora_merge_dtype", None),
            )
        else:
            sources[ref] = open_model(ref, allow_pickle=options.allow_pickle)
    return sources


def run_stages(
    text: str,
    source: str,
    out: Path,
    options,
    intermediate_dir: Path | None = None,
) -> Path:
    """`merge run` of a multi-document recipe: plan every stage, then merge them in order."""
    from merger.core.engine import run_recipe

    out, folder = stage_folders(out, intermediate_dir, options)
    stages = load_stages(text, source, out, folder)
    announce_stages(stages, folder)
    to_merge = plan_stages(stages, options)

    def merge(stage: Stage, stage_options) -> None:
        run_recipe(stage.recipe, stage.out, stage_options, recipe_text=stage.text)

    return merge_stages(stages, out, folder, options, to_merge, merge)


def stage_folders(out: Path, intermediate_dir: Path | None, options) -> tuple[Path, Path]:
    """The output and the intermediates' folder of a multi-document run; an existing output
    without --overwrite is refused before anything is planned."""
    out = Path(out)
    folder = Path(intermediate_dir) if intermediate_dir else default_intermediate_dir(out)
    if out.expanduser().resolve().exists() and not options.overwrite:
        raise KruisingError(
            f"output folder {out} already exists", "choose another --out, or pass --overwrite"
        )
    return out, folder.expanduser().resolve()


def announce_stages(stages: list, folder: Path) -> None:
    console.print(
        f"{len(stages)} stages: {', '.join(s.name or 'final merge' for s in stages)}; "
        f"intermediates in {folder}"
    )


def merge_stages(stages: list, out: Path, folder: Path, options, to_merge: set[str], merge, tag=""):
    """Merge the stages in order with ``merge(stage, stage_options)`` (either engine): a named
    stage not in ``to_merge`` is reused as it is; an intermediate is written over a stale one;
    an error names its stage."""
    from dataclasses import replace

    for i, stage in enumerate(stages, 1):
        label = stage.name or "final merge"
        if stage.name is not None and str(stage.name) not in to_merge:
            console.print(f"stage {i}/{len(stages)} {label}: reusing {stage.out}")
            continue
        console.print(f"stage {i}/{len(stages)} {label} -> {stage.out}{tag}")
        final = stage.out == out
        stage_options = options if final else replace(options, overwrite=True)
        if not final:
            folder.mkdir(parents=True, exist_ok=True)
        try:
            merge(stage, stage_options)
        except KruisingError as exc:
            raise KruisingError(f"stage {label}: {exc.message}", exc.hint) from None
    return out
