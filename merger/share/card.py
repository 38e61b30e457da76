"""Model cards for children: front-matter the Hub understands, the recipe, the scores, how to rebuild.

A card is built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` so the front-matter is the
Hub's own schema: ``base_model`` (every parent), ``tags``, ``language``, ``library_name``,
``license`` and a ``model-index`` with the scorecard's numbers.

When is a child Dutch (tag ``dutch``, ``language: [nl, en]``)? When any of these holds:

1. a parent declares Dutch: its local ``README.md`` front-matter lists ``nl`` (or ``nld``, ``dut``,
   ``dutch``) under ``language``, or ``dutch`` under ``tags``;
2. a parent's name says so: a ``-``/``_``/``.``-separated word of its last path part is ``nl``,
   ``nld``, ``dutch``, ``nederlands`` or ``geitje`` (``Rijgersberg/GEITje-7B``, ``./tiny/nl``);
3. the scorecard measured Dutch: it carries a numeric ``dutch_score``.

Otherwise ``language`` is the union of what the parents declare (omitted when none do).
English stays in the list of a Dutch child: every parent is a Mistral model, trained on English.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kruising.atomic import write_text
from kruising.config import compose_yaml
from kruising.console import fmt
from kruising.errors import KruisingError
from kruising.hub import is_hub_id, strip_revision

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

    from merger.core.recipe import MergeRecipe

#: merge_method → (name, paper or reference). The URLs are the ones mergekit's cards link.
METHOD_REFERENCES: dict[str, tuple[str, str]] = {
    "linear": ("Linear (model soups)", "https://arxiv.org/abs/2203.05482"),
    "slerp": ("SLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "nuslerp": ("NuSLERP", "https://en.wikipedia.org/wiki/Slerp"),
    "task_arithmetic": ("Task Arithmetic", "https://arxiv.org/abs/2212.04089"),
    "ties": ("TIES", "https://arxiv.org/abs/2306.01708"),
    "dare_ties": ("DARE TIES", "https://arxiv.org/abs/2311.03099"),
    "dare_linear": ("Linear DARE", "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": ("Model Breadcrumbs", "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": ("Model Breadcrumbs with TIES", "https://arxiv.org/abs/2312.06795"),
    "della": ("DELLA", "https://arxiv.org/abs/2406.11617"),
    "della_linear": ("Linear DELLA", "https://arxiv.org/abs/2406.11617"),
    "model_stock": ("Model Stock", "https://arxiv.org/abs/2403.19522"),
    "sce": ("SCE", "https://arxiv.org/abs/2408.07990"),
    "karcher": ("Karcher Mean", "https://arxiv.org/abs/2603.04972"),
    "multislerp": ("Multi-SLERP", "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "nearswap": ("NearSwap", "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "passthrough": ("Passthrough", ""),
}

BASE_TAGS = ["merge", "mergekit", "kruising"]
DUTCH_LANGUAGE_CODES = {"nl", "nld", "dut", "dutch"}
DUTCH_NAME_WORDS = {"nl", "nld", "dutch", "nederlands", "geitje"}
#: Placeholder in the "Reproduce" section until the card is pushed (push fills in the repo id).
REPO_PLACEHOLDER = "<org>/<name>"
RECIPE_HEADING = "## Recipe"


# --------------------------------------------------------------------------------------------
# Building the card (pure: no file or network access)
# --------------------------------------------------------------------------------------------


def build_model_card(recipe_text: str, recipe: MergeRecipe, **kwargs: Any) -> ModelCard:
    """The card of a child merged by ``recipe`` as huggingface_hub's ``ModelCard`` (the
    arguments of `model_card_text`)."""
    from huggingface_hub import ModelCard

    return ModelCard(model_card_text(recipe_text, recipe, **kwargs))


def model_card_text(
    recipe_text: str,
    recipe: MergeRecipe,
    *,
    scorecard: Mapping[str, Any] | None = None,
    licenses: Sequence[str] | None = None,
    language: Sequence[str] | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    compute: Mapping[str, Any] | None = None,
) -> str:
    """The card (README.md text) of a child merged by ``recipe`` (whose YAML source is
    ``recipe_text``): what ``str(build_model_card(...))`` is, without importing
    huggingface_hub's ``repocard`` (its Hub client: 0.3 CPU s of every `merge run`).

    ``licenses``: the licenses the parents declare (any order, repeats allowed); ``language``: the
    languages they declare. ``repo_id`` marks a card bound for that Hub repo: it fills the
    ``merge pull`` command (a placeholder without) and ``base_model`` keeps only the parents that
    are Hub ids, as mergekit's cards do (a local path means nothing on the Hub, and the Hub's
    metadata check expects model ids); the body still lists every parent. ``compute``: the
    provenance's ``compute_dtype`` record (which dtype the tensors were computed in).
    """
    from huggingface_hub.repocard_data import ModelCardData

    parents = recipe.referenced_models()
    name = model_name or (repo_id.split("/")[-1] if repo_id else "merged-model")
    dutch = _is_dutch(parents, language, scorecard)
    languages = _languages(language, dutch)
    license_fields, license_line = _license(licenses)
    eval_results = _eval_results(scorecard) if scorecard else []
    base_models = [strip_revision(p) for p in parents if repo_id is None or is_hub_id(p)]

    data = ModelCardData(
        base_model=base_models or None,
        tags=BASE_TAGS + (["dutch"] if dutch else []),
        language=languages,
        library_name="transformers",
        pipeline_tag="text-generation",
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
        **license_fields,
    )
    body = _body(
        name=name,
        recipe_text=recipe_text,
        recipe=recipe,
        parents=parents,
        dutch=dutch,
        license_line=license_line,
        scorecard=scorecard,
        repo_id=repo_id,
        compute=compute,
    )
    return f"---\n{data.to_yaml()}\n---\n\n{body}"


def _name_is_dutch(ref: str) -> bool:
    last = strip_revision(ref).rstrip("/").split("/")[-1].lower()
    return any(word in DUTCH_NAME_WORDS for word in re.split(r"[-_.\s]+", last))


def _is_dutch(
    parents: Sequence[str],
    language: Sequence[str] | None,
    scorecard: Mapping[str, Any] | None,
) -> bool:
    if any(code.lower() in DUTCH_LANGUAGE_CODES for code in language or ()):
        return True
    if any(_name_is_dutch(p) for p in parents):
        return True
    score = (scorecard or {}).get("dutch_score")
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def _languages(declared: Sequence[str] | None, dutch: bool) -> list[str] | None:
    langs = [code for code in declared or () if code.lower() not in DUTCH_LANGUAGE_CODES]
    if dutch:
        langs = ["nl", "en"] + [code for code in langs if code != "en"]
    return list(dict.fromkeys(langs)) or None


def _license(licenses: Sequence[str] | None) -> tuple[dict[str, str], str]:
    """Front-matter fields and a sentence for the body, from the parents' declared licenses."""
    distinct = list(dict.fromkeys(lic.strip() for lic in licenses or () if lic and lic.strip()))
    if not distinct:
        return {}, "The parents declare no license here; check each parent's terms before use."
    if len(distinct) == 1:
        return {"license": distinct[0]}, f"All parents that declare a license use `{distinct[0]}`."
    listed = ", ".join(f"`{lic}`" for lic in distinct)
    return (
        {"license": "other", "license_name": "parents-licenses"},
        f"The parents declare different licenses ({listed}); the child is bound by all of them.",
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _eval_results(scorecard: Mapping[str, Any]) -> list[Any]:
    """``model-index`` entries: the two aggregates, then every probe metric (``n`` is a count)."""
    from huggingface_hub import EvalResult

    suite = str(scorecard.get("suite") or "nl")
    dataset_name = f"kruising probes ({suite})"
    common = dict(
        task_type="text-generation",
        task_name="Text Generation",
    )
    results = []
    for key in ("dutch_score", "english_score"):
        value = _number(scorecard.get(key))
        if value is not None:
            results.append(
                EvalResult(
                    dataset_type="kruising-probes",
                    dataset_name=dataset_name,
                    dataset_config=suite,
                    metric_type=key,
                    metric_name=key,
                    metric_value=value,
                    **common,
                )
            )
    for probe, metrics in (scorecard.get("probes") or {}).items():
        if not isinstance(metrics, Mapping):
            continue
        for metric, raw in metrics.items():
            value = _number(raw)
            if metric == "n" or metric.endswith("_se") or value is None:
                continue
            results.append(
                EvalResult(
                    dataset_type="kruising-probes",
                    dataset_name=f"kruising probe {probe}",
                    dataset_config=str(probe),
                    metric_type=str(metric),
                    metric_name=f"{probe} {metric}",
                    metric_value=value,
                    **common,
                )
            )
    return results


def _interval(scorecard: Mapping[str, Any], key: str) -> str:
    ci = scorecard.get(f"{key}_ci")
    return f" (95% interval {fmt(ci[0])}–{fmt(ci[1])})" if ci else ""


def _model_md(ref: str) -> str:
    if is_hub_id(ref):
        bare = strip_revision(ref)
        return f"[{ref}](https://huggingface.co/{bare})"
    return f"`{ref}` (local folder)"


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text`` (the recipe stays verbatim)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _body(
    *,
    name: str,
    recipe_text: str,
    recipe: MergeRecipe,
    parents: Sequence[str],
    dutch: bool,
    license_line: str,
    scorecard: Mapping[str, Any] | None,
    repo_id: str | None,
    compute: Mapping[str, Any] | None = None,
) -> str:
    method = recipe.merge_method
    title, url = METHOD_REFERENCES.get(method, (method, ""))
    method_md = f"[{title}]({url})" if url else title
    base = recipe.base_model
    lines = [
        f"# {name}",
        "",
        f"A merge of {len(parents)} Mistral-family model{'s' if len(parents) != 1 else ''}, "
        f"made with kruising from a mergekit recipe, using the {method_md} merge method "
        f"(`merge_method: {method}`)" + (f" with {_model_md(base)} as the base." if base else "."),
    ]
    flag = ""
    if compute:
        dtypes = "/".join(compute.get("dtypes") or []) or "the stored dtype"
        if compute.get("choice") == "float32":
            flag = " --compute-dtype float32"
            lines += [
                "",
                f"Computed in {dtypes} (`merge run --compute-dtype float32`), not in the "
                "recipe's `dtype` as mergekit computes it: the tensors differ from mergekit's "
                "child by rounding.",
            ]
        else:
            lines += ["", f"Computed as mergekit computes it, in {dtypes} (the recipe's `dtype`)."]
    if dutch:
        lines += ["", "A Dutch merge: a parent is Dutch, or the child was scored on Dutch probes."]
    lines += ["", "## Parents", "", "| role | model |", "|---|---|"]
    for ref in parents:
        role = "base" if base and ref == base else "merged"
        lines.append(f"| {role} | {_model_md(ref)} |")
    lines += ["", license_line, "", "## Scores", ""]
    lines += _scores_md(scorecard)
    fence = _fence(recipe_text)
    lines += [
        "",
        RECIPE_HEADING,
        "",
        "The recipe exactly as given to `merge run` (also in `mergekit_config.yml`):",
        "",
        f"{fence}yaml",
        recipe_text.rstrip("\n"),
        fence,
        "",
        "## Reproduce",
        "",
        "```bash",
        f"merge pull {repo_id or REPO_PLACEHOLDER} --out recipe.yaml",
        f"merge run recipe.yaml --out child{flag}",
        "```",
        "",
        "`merge pull` takes the recipe from this repository and validates it; `merge run` merges the "
        "same tensors again. Hub parents are downloaded; local parents must exist at the same paths.",
        "",
    ]
    return "\n".join(lines)


def _scores_md(scorecard: Mapping[str, Any] | None) -> list[str]:
    if not scorecard:
        return [
            "Not scored yet. Score it with `merge eval CHILD --out CHILD`; the card is refreshed "
            "with the numbers (and `merge push` uploads them)."
        ]
    suite = scorecard.get("suite", "?")
    seconds = _number(scorecard.get("seconds"))
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [
        f"Scored with `merge eval --suite {suite}`{took}.",
        "",
        f"- dutch_score: **{fmt(scorecard.get('dutch_score'))}**{_interval(scorecard, 'dutch_score')}",
        f"- english_score: **{fmt(scorecard.get('english_score'))}**{_interval(scorecard, 'english_score')}",
        "",
        "| probe | metric | value | ± standard error | items |",
        "|---|---|---|---|---|",
    ]
    for probe, metrics in (scorecard.get("probes") or {}).items():
        if not isinstance(metrics, Mapping):
            continue
        count = fmt(metrics.get("n"))
        for metric, value in metrics.items():
            if metric != "n" and not metric.endswith("_se"):
                se = metrics.get(f"{metric}_se")
                spread = fmt(se) if se is not None else ""
                lines.append(f"| {probe} | {metric} | {fmt(value)} | {spread} | {count} |")
    return lines


# --------------------------------------------------------------------------------------------
# Reading what the parents declare, writing and refreshing a child's card
# --------------------------------------------------------------------------------------------


def read_front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front-matter of a card as a dict (``{}`` when there is none or it is broken).

    A parent's card is a stranger's text: it is read with the limits of `compose_yaml` (size,
    alias expansion, no object tags), so an alias bomb there is a broken card, not a hang."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"\A\s*---\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", text, re.DOTALL)
    if not match:
        return {}
    data, _, _ = compose_yaml(match.group(1), str(readme))  # None when broken or refused
    return data if isinstance(data, dict) else {}


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value if v is not None]
    return []


def parent_declarations(
    parents: Sequence[str], root: Path | None = None
) -> tuple[list[str], list[str]]:
    """(licenses, languages) declared by the parents that are local folders.

    Reads each folder's ``README.md`` front-matter (``license``, ``language``, ``tags: [dutch]``)
    and a ``license`` key in ``config.json`` if one is there. Relative paths resolve against
    ``root`` (default: the working directory), as ``merge run`` resolves them.
    """
    licenses: list[str] = []
    languages: list[str] = []
    for ref in parents:
        folder = Path(ref).expanduser()
        if not folder.is_absolute() and root is not None:
            folder = root / folder
        if not folder.is_dir():
            continue
        meta = read_front_matter(folder / "README.md")
        licenses += _as_list(meta.get("license"))
        languages += _as_list(meta.get("language"))
        if "dutch" in [t.lower() for t in _as_list(meta.get("tags"))]:
            languages.append("nl")
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        if isinstance(config, dict):
            licenses += _as_list(config.get("license"))
    return list(dict.fromkeys(licenses)), list(dict.fromkeys(languages))


def write_model_card(
    child_dir: Path,
    recipe_text: str,
    recipe: MergeRecipe,
    *,
    scorecard: Mapping[str, Any] | None = None,
    compute: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``child_dir/README.md`` for a child merged by ``recipe``; return its path.

    The child may still be in its temporary folder: the model name drops a ``.tmp…`` suffix.
    """
    child_dir = Path(child_dir)
    licenses, languages = parent_declarations(recipe.referenced_models())
    text = model_card_text(
        recipe_text,
        recipe,
        scorecard=scorecard,
        licenses=licenses,
        language=languages,
        model_name=_child_name(child_dir),
        compute=compute,
    )
    target = child_dir / "README.md"
    with open(target, "w", newline="", encoding="utf-8") as f:  # as ModelCard.save writes it
        f.write(text)
    return target


def _child_name(child_dir: Path) -> str:
    name = child_dir.resolve().name
    bare = re.sub(r"\.(kruising-)?(tmp|partial|incomplete)(-[^/]*)?$", "", name.lstrip("."))
    return bare or name


def read_child_recipe(child_dir: Path) -> tuple[str, MergeRecipe]:
    """The recipe text of a child (``mergekit_config.yml``) and the parsed recipe."""
    from merger.core.recipe import parse_recipe

    path = Path(child_dir) / "mergekit_config.yml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KruisingError(
            f"{child_dir} has no mergekit_config.yml",
            "a child written by `merge run` has one; rebuild the child or copy its recipe there",
        ) from None
    return text, parse_recipe(text, source=str(path))


def find_scorecard(child_dir: Path) -> dict[str, Any] | None:
    """``child/scorecard.json``, else the one ``child/*/scorecard.json`` (``merge eval --out``)."""
    child_dir = Path(child_dir)
    candidates = [child_dir / "scorecard.json"]
    if not candidates[0].is_file():
        candidates = sorted(child_dir.glob("*/scorecard.json"))
    if len(candidates) != 1 or not candidates[0].is_file():
        return None
    try:
        data = json.loads(candidates[0].read_text(encoding="utf-8"))
    except ValueError as exc:
        raise KruisingError(
            f"{candidates[0]} is not valid JSON ({exc})",
            "score the child again with `merge eval CHILD --out CHILD`",
        ) from None
    return data if isinstance(data, dict) else None


def render_child_card(
    child_dir: Path,
    *,
    scorecard: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of an existing child, from its recipe and scorecard (``scorecard.json`` if not given).

    Licenses and languages come from the parents when they are still on disk, else from the
    child's current card, so a refresh never drops what the first card declared.
    """
    child_dir = Path(child_dir)
    recipe_text, recipe = read_child_recipe(child_dir)
    if scorecard is None:
        scorecard = find_scorecard(child_dir)
    licenses, languages = parent_declarations(recipe.referenced_models())
    current = read_front_matter(child_dir / "README.md")
    if not licenses:
        licenses = [lic for lic in _as_list(current.get("license")) if lic != "other"]
    if not languages:
        languages = _as_list(current.get("language"))
    current_name = None
    index = current.get("model-index")
    if isinstance(index, list) and index and isinstance(index[0], dict):
        current_name = index[0].get("name")
    name = current_name or _child_name(child_dir)
    if repo_id:
        name = repo_id.split("/")[-1]
    return build_model_card(
        recipe_text,
        recipe,
        scorecard=scorecard,
        licenses=licenses,
        language=languages,
        model_name=name,
        repo_id=repo_id,
        compute=_provenance_compute(child_dir),
    )


def _provenance_compute(child_dir: Path) -> Mapping[str, Any] | None:
    """The child's recorded compute dtype (kruising_provenance.json), if it has one."""
    try:
        record = json.loads((child_dir / "kruising_provenance.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    compute = record.get("compute_dtype") if isinstance(record, dict) else None
    return compute if isinstance(compute, dict) else None


def update_card_scores(child_dir: Path, scorecard: Mapping[str, Any]) -> Path:
    """Rewrite ``child_dir/README.md`` with ``scorecard``'s numbers (after ``merge eval``)."""
    child_dir = Path(child_dir)
    card = render_child_card(child_dir, scorecard=scorecard)
    return write_text(child_dir / "README.md", card.content)  # a kill mid-write keeps the old card


def is_kruising_card(readme: Path) -> bool:
    """True when ``readme`` is a card this module wrote (its tags include ``kruising``)."""
    return "kruising" in _as_list(read_front_matter(readme).get("tags"))


def refresh_child_card(folder: Path, scorecard: Mapping[str, Any], written: Path) -> Path | None:
    """After ``merge eval CHILD --out CHILD``: a child merged here and scored into itself
    (``written`` lies inside ``folder``) gets its model card rewritten with the scores, as
    `merge push` would show them. Someone else's card is left as it is. Returns the card."""
    if not folder.is_dir() or not written.resolve().is_relative_to(folder.resolve()):
        return None
    from merger.share.hub import RECIPE_FILE

    readme = folder / "README.md"
    if not (folder / RECIPE_FILE).is_file() or not readme.is_file():
        return None
    if not is_kruising_card(readme):
        return None
    return update_card_scores(folder, scorecard)
