"""The README's table of mergekit recipe features stays true: each row's example is run
through our parser and planner on tiny checkpoints, and through mergekit's own checks.

- native: parses and plans natively (a multi-document example: every stage planned);
- mergekit only: refused natively with a message saying to use --engine mergekit, and accepted
  by mergekit's MergeConfiguration (its method and dtype names too);
- refused: refused natively, and by mergekit as well unless the row's note gives a reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kruising.errors import KruisingError
from tests.merger.core.test_adapter import lora_models  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parents[3] / "README.md"
STATUSES = ("native", "mergekit only", "refused")
PLACEHOLDER = re.compile(r"\b(model-[abc]|lora-a)\b")


def feature_rows() -> list[tuple[str, str, str, str]]:
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- mergekit-features:start -->")[1].split(
        "<!-- mergekit-features:end -->"
    )[0]
    rows = []
    for line in block.strip().splitlines()[2:]:  # the header and its rule
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        cells = [c.strip().strip("|").strip() for c in cells]
        assert len(cells) == 4, line
        feature, status, example, note = cells
        assert status in STATUSES, line
        assert example.startswith("`") and example.endswith("`"), line
        rows.append((feature, status, example.strip("`"), note))
    return rows


ROWS = feature_rows()


def test_the_table_covers_every_mergekit_method_and_top_level_key():
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    examples = " ".join(example for _, _, example, _ in ROWS)
    for method in registry.registered_methods():
        assert f"merge_method: {method.spec.name}" in examples, method.spec.name
    for key in MergeConfiguration.model_fields:
        assert re.search(rf"\b{key}:", examples), key


@pytest.fixture(scope="session")
def placeholders(lora_models, make_tiny_mistral):  # noqa: F811
    return {
        "model-a": lora_models["a"],
        "model-b": lora_models["b"],
        "model-c": make_tiny_mistral("readme-c", seed=3, dtype="bfloat16"),
        "lora-a": lora_models["plain"],
    }


def documents(example: str, placeholders: dict[str, Path]) -> str:
    text = PLACEHOLDER.sub(lambda m: str(placeholders[m[1]]), example)
    return "\n---\n".join(part.strip() for part in text.split(" --- "))


def plan_natively(text: str, tmp_path: Path) -> None:
    """What `merge run` does before its first byte: parse, open, plan, check."""
    from merger.core.child import check_chat_template
    from merger.core.engine import open_sources
    from merger.core.multidoc import is_multi_document, load_stages, plan_stages
    from merger.core.options import MergeOptions
    from merger.core.plan import build_plan
    from merger.core.recipe import parse_recipe

    if is_multi_document(text):
        stages = load_stages(text, "README", tmp_path / "out", tmp_path / "stages")
        plan_stages(stages, MergeOptions(device="cpu"))
        return
    recipe = parse_recipe(text, "README")
    sources = open_sources(recipe)
    try:
        build_plan(recipe, sources)
        check_chat_template(recipe.chat_template)
    finally:
        for source in sources.values():
            source.close()


def mergekit_accepts(text: str) -> bool:
    from mergekit import merge_methods
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration

    try:
        names = set()
        for doc in yaml.safe_load_all(text):
            name = doc.pop("name", None)
            if name in names:
                return False
            names.add(name)
            config = MergeConfiguration.model_validate(doc)
            merge_methods.get(config.merge_method)
            dtype_from_name(config.dtype)
            dtype_from_name(config.out_dtype)
    except Exception:
        return False
    return True


@pytest.mark.parametrize(
    ("feature", "status", "example", "note"), ROWS, ids=[f"{r[1]}: {r[0]}" for r in ROWS]
)
def test_readme_feature_row(feature, status, example, note, placeholders, tmp_path):
    text = documents(example, placeholders)
    if status == "native":
        plan_natively(text, tmp_path)
        assert mergekit_accepts(text), "a native feature mergekit does not take"
        return
    with pytest.raises(KruisingError) as refusal:
        plan_natively(text, tmp_path)
    said = f"{refusal.value.message}\n{refusal.value.hint}"
    if status == "mergekit only":
        assert "--engine mergekit" in said, said
        assert mergekit_accepts(text), "mergekit's MergeConfiguration rejects it"
    else:
        assert "--engine mergekit" not in refusal.value.message, said
        assert note or not mergekit_accepts(text), "mergekit takes it: the note says why we don't"
