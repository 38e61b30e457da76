"""Recipes: mergekit's schema, strict, every problem with file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kruising.errors import KruisingError
from merger.core.recipe import (
    ConditionalParameter,
    InputModel,
    MergeRecipe,
    RecipeError,
    canonical_dtype,
    evaluate_setting,
    load_recipe,
    parse_model_ref,
    parse_recipe,
    recipe_to_yaml,
    validate_recipe,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
DOC_RECIPES = sorted((HERE / "recipes").glob("*.yml"))
REJECTED = HERE / "recipes" / "rejected"
DEMO_RECIPES = sorted((REPO / "recipes" / "examples").glob("*.yml"))


def parse(text: str, source: str = "recipe.yaml") -> MergeRecipe:
    return parse_recipe(textwrap.dedent(text).lstrip("\n"), source)


# ----------------------------------------------------------------------------------------------
# Every documented mergekit recipe parses, round-trips, and means the same to mergekit
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mergekit_config():
    """mergekit's own schema (imports torch, so once per module)."""
    from mergekit.config import MergeConfiguration

    return MergeConfiguration


@pytest.mark.parametrize("path", DOC_RECIPES, ids=lambda p: p.stem)
def test_documented_recipe_parses_like_mergekit(path: Path, mergekit_config) -> None:
    recipe = load_recipe(path)
    theirs = mergekit_config.model_validate(yaml.safe_load(path.read_text()))

    assert recipe.merge_method == theirs.merge_method
    assert set(recipe.referenced_models()) == {str(m) for m in theirs.referenced_models()}
    assert recipe.dtype == theirs.dtype
    assert parse_recipe(recipe_to_yaml(recipe)) == recipe
    again = mergekit_config.model_validate(yaml.safe_load(recipe_to_yaml(recipe)))
    assert again.model_dump() == theirs.model_dump()


def test_documented_recipes_cover_the_methods_we_promise() -> None:
    methods = {load_recipe(p).merge_method for p in DOC_RECIPES}
    promised = {
        "linear",
        "slerp",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "della",
        "model_stock",
        "passthrough",
    }
    assert promised <= methods, promised - methods
    assert len(DOC_RECIPES) >= 20


@pytest.mark.parametrize("path", DEMO_RECIPES, ids=lambda p: p.stem)
def test_demo_recipes_parse(path: Path, mergekit_config) -> None:
    recipe = load_recipe(path)
    mergekit_config.model_validate(yaml.safe_load(path.read_text()))
    assert parse_recipe(recipe_to_yaml(recipe)) == recipe


def test_the_examples_show_every_native_method_and_each_form() -> None:
    from merger.core.methods import METHODS

    recipes = [load_recipe(p) for p in DEMO_RECIPES]
    assert {r.merge_method for r in recipes} == set(METHODS)
    assert any(r.models and r.merge_method == "linear" for r in recipes)
    assert any(r.slices and r.merge_method == "slerp" for r in recipes)
    assert any(r.slices and r.merge_method == "passthrough" for r in recipes)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        (
            "gradient-slerp-pattern.yml",
            r"gradient-slerp-pattern\.yml:14: parameters\.t\[0\]\.pattern: unknown key",
        ),
        ("linear-small-metrics.yml", r"linear-small-metrics\.yml:11: metric_method: unknown key"),
        (
            "whisper-slerp-weight.yml",
            r"whisper-slerp-weight\.yml:7: models\[0\]\.parameters\.weight",
        ),
    ],
)
def test_documented_recipes_mergekit_misreads_are_rejected(
    name: str, match: str, mergekit_config
) -> None:
    path = REJECTED / name
    if "merge_method" in yaml.safe_load(path.read_text()):
        mergekit_config.model_validate(yaml.safe_load(path.read_text()))  # mergekit says yes
    with pytest.raises(KruisingError, match=match):
        load_recipe(path)


def test_pattern_key_suggests_filter() -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(REJECTED / "gradient-slerp-pattern.yml")
    assert "did you mean 'filter'?" in info.value.hint
    assert len(info.value.problems) == 2  # both pattern: entries, each on its own line
    assert [p.line for p in info.value.problems] == [14, 16]


# ----------------------------------------------------------------------------------------------
# Validation messages
# ----------------------------------------------------------------------------------------------


def test_unknown_key_names_file_line_field_and_suggests() -> None:
    with pytest.raises(
        KruisingError, match=r"^recipe\.yaml:7: models\[1\]\.parameters\.densty: unknown key"
    ) as info:
        parse(
            """
            merge_method: ties
            base_model: org/base
            models:
              - model: org/a
              - model: org/b
                parameters:
                  densty: 0.5
                  weight: 1.0
            """
        )
    assert "did you mean 'density'?" in info.value.hint


def test_unknown_top_level_key_suggests_closest() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:4: tokenizer_sorce: unknown key"
    ) as info:
        parse(
            """
            merge_method: linear
            models:
              - model: org/a
            tokenizer_sorce: base
            """
        )
    assert "did you mean 'tokenizer_source'?" in info.value.hint


def test_unknown_key_in_slice_source() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:5: slices\[0\]\.sources\[0\]\.layers: unknown key"
    ) as info:
        parse(
            """
            merge_method: passthrough
            slices:
              - sources:
                  - model: org/a
                    layers: [0, 4]
            """
        )
    assert "did you mean 'layer_range'?" in info.value.hint


def test_both_models_and_slices() -> None:
    with pytest.raises(KruisingError, match=r"recipe\.yaml:4: slices: both models and slices"):
        parse(
            """
            merge_method: linear
            models:
              - model: org/a
            slices:
              - sources:
                  - model: org/a
                    layer_range: [0, 4]
            """
        )


def test_neither_models_nor_slices() -> None:
    with pytest.raises(KruisingError, match=r"recipe\.yaml:1: no models, slices or modules"):
        parse("merge_method: linear\ndtype: float16\n")


def test_empty_models_list_counts_as_none_like_mergekit() -> None:
    with pytest.raises(KruisingError, match=r"no models, slices or modules"):
        parse("merge_method: linear\nmodels: []\n")


def test_missing_merge_method() -> None:
    with pytest.raises(KruisingError, match=r"recipe\.yaml:1: merge_method: missing required key"):
        parse("models:\n  - model: org/a\n")


@pytest.mark.parametrize("field", ["dtype", "out_dtype"])
def test_bad_dtype_suggests_the_name(field: str) -> None:
    with pytest.raises(
        KruisingError, match=rf"recipe\.yaml:3: {field}: unknown dtype 'bf16'"
    ) as info:
        parse(f"merge_method: linear\nmodels: [{{model: org/a}}]\n{field}: bf16\n")
    assert "did you mean 'bfloat16'?" in info.value.hint


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16", "float64", "torch.bfloat16"])
def test_dtype_names_mergekit_accepts(name: str) -> None:
    recipe = parse(f"merge_method: linear\nmodels: [{{model: org/a}}]\ndtype: {name}\n")
    assert recipe.dtype == name
    assert canonical_dtype(name) == name.removeprefix("torch.")


def test_canonical_dtype_rejects_unknown() -> None:
    assert canonical_dtype("fp16") is None
    assert canonical_dtype(None) is None


@pytest.mark.parametrize(
    "layer_range",
    ["[4, 2]", "[3, 3]", "[-1, 4]", "[0]", "[0, 4, 8]", "[0, 4.5]", "'0-4'", "[true, 4]"],
)
def test_bad_layer_range(layer_range: str) -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:5: slices\[0\]\.sources\[0\]\.layer_range: layer_range must be \[start, end\]",
    ):
        parse(
            f"""
            merge_method: passthrough
            slices:
              - sources:
                  - model: org/a
                    layer_range: {layer_range}
            """
        )


def test_layer_range_is_a_tuple() -> None:
    recipe = parse(
        """
        merge_method: passthrough
        slices:
          - sources:
              - model: org/a
                layer_range: [0, 24]
        """
    )
    assert recipe.slices is not None
    assert recipe.slices[0].sources[0].layer_range == (0, 24)


def test_integral_float_layer_range_is_accepted_like_mergekit() -> None:
    recipe = parse(
        "merge_method: passthrough\nslices:\n  - sources:\n      - {model: a, layer_range: [0, 8.0]}\n"
    )
    assert recipe.slices is not None and recipe.slices[0].sources[0].layer_range == (0, 8)


def test_slice_without_sources() -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:3: slices\[0\]\.sources: list should have at least 1 item",
    ):
        parse("merge_method: passthrough\nslices:\n  - sources: []\n")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("org/a+org/a-lora", "org/a+org/a-lora"),
        ("org/a@main+./lora", "org/a@main+./lora"),
        ("{model: org/a, lora: org/a-lora}", "org/a+org/a-lora"),
        ("{model: {path: org/a, revision: v1}, lora: {path: ./l}}", "org/a@v1+./l"),
        ("{model: org/a}", "org/a"),
    ],
)
def test_lora_references_as_mergekit_takes_them(model: str, expected: str) -> None:
    recipe = parse(f"merge_method: linear\nbase_model: {model}\nmodels:\n  - model: {model}\n")
    assert recipe.models[0].model == expected and recipe.base_model == expected


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ("org/a+org/b+org/c", r"models\[0\]\.model: a model reference has at most one \+adapter"),
        ("org/a+", r"models\[0\]\.model: a model reference is a local folder or a Hub id"),
        ("{model: org/a, lora: x, adapter: y}", r"model and lora, not adapter"),
        ("{model: org/a, override_architecture: X}", r"override_architecture is not native"),
    ],
)
def test_bad_lora_references(model: str, match: str) -> None:
    with pytest.raises(KruisingError, match=match) as info:
        parse(f"merge_method: linear\nmodels:\n  - model: {model}\n")
    assert info.value.hint


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("org/a@v1@v2", "a model reference has at most one @revision"),
        ("org/a@", "incomplete model reference"),
        ("'@main'", "incomplete model reference"),
        ("''", "a model reference is a local folder or a Hub id"),
        ("null", "a model reference is a local folder or a Hub id"),
        ("[org/a]", "a model reference is a local folder or a Hub id"),
        (
            "{path: org/a}",
            r"a model reference is a local folder or a Hub id, got \{'path': 'org/a'\}$",
        ),
    ],
)
def test_bad_model_refs(ref: str, match: str) -> None:
    with pytest.raises(KruisingError, match=rf"recipe\.yaml:3: models\[0\]\.model: {match}"):
        parse(f"merge_method: linear\nmodels:\n  - model: {ref}\n")


def test_tokenizer_and_tokenizer_source_together() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:4: tokenizer: both tokenizer_source and tokenizer given"
    ):
        parse(
            """
            merge_method: linear
            models: [{model: org/a}]
            tokenizer_source: base
            tokenizer:
              source: union
            """
        )


@pytest.mark.parametrize("source", ["base", "union", "org/a", "org/a@main", "./models/nl"])
def test_tokenizer_source_values(source: str) -> None:
    recipe = parse(
        f"merge_method: linear\nmodels: [{{model: org/a}}]\ntokenizer_source: {source}\n"
    )
    assert recipe.tokenizer_source == source


def test_tokenizer_source_model_prefix_is_explained() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:3: tokenizer_source: the 'model:' prefix"
    ) as info:
        parse("merge_method: linear\nmodels: [{model: org/a}]\ntokenizer_source: 'model:org/a'\n")
    assert "tokenizer_source: org/a" in info.value.hint


def test_tokenizer_block_errors() -> None:
    with pytest.raises(RecipeError) as info:
        parse(
            """
            merge_method: linear
            models: [{model: org/a}]
            tokenizer:
              source: base
              pad_to_multiple_of: 0
              tokens:
                <|im_end|>:
                  source: {kind: model_token, model: org/a}
                <pad>:
                  source: {kind: zerro}
                  forse: true
            """
        )
    text = str(info.value)
    assert "recipe.yaml:5: tokenizer.pad_to_multiple_of: must be a positive integer, got 0" in text
    assert (
        "recipe.yaml:8: tokenizer.tokens['<|im_end|>'].source: a model_token source names exactly "
        "one of token_id or token" in text
    )
    assert (
        "recipe.yaml:10: tokenizer.tokens['<pad>'].source: a token source is a model reference"
        in text
    )
    assert "recipe.yaml:11: tokenizer.tokens['<pad>'].forse: unknown key" in text
    assert "did you mean 'force'?" in info.value.hint


def test_tokenizer_models() -> None:
    recipe = load_recipe(HERE / "recipes" / "docs-tokenizer.yml")
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "union"
    assert recipe.tokenizer_models() == ["teknium/OpenHermes-2.5-Mistral-7B"]


def test_invalid_yaml_names_the_line() -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:5: invalid YAML: while parsing a flow mapping \(from line 4\)",
    ) as info:
        parse(
            """
            merge_method: linear
            models:
              - model: org/a
                parameters: {weight: 1.0
            dtype: float16
            """
        )
    assert "indentation" in info.value.hint


def test_tab_indentation_is_invalid_yaml_with_line() -> None:
    with pytest.raises(KruisingError, match=r"recipe\.yaml:3: invalid YAML"):
        parse_recipe("merge_method: linear\nmodels:\n\t- model: org/a\n", "recipe.yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_recipe(text: str) -> None:
    with pytest.raises(KruisingError, match=r"^recipe\.yaml:1: empty recipe$"):
        parse_recipe(text, "recipe.yaml")


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just words\n", "str")])
def test_recipe_must_be_a_mapping(text: str, kind: str) -> None:
    with pytest.raises(
        KruisingError, match=rf"recipe\.yaml:1: a recipe is a mapping of keys, got a {kind}"
    ):
        parse_recipe(text, "recipe.yaml")


def test_several_documents_are_refused() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:3: invalid YAML: several YAML documents.*mergekit-multi"
    ):
        parse_recipe(
            "merge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\n", "recipe.yaml"
        )


def test_duplicate_key() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:3: merge_method: duplicate key \(first on line 1\)"
    ):
        parse_recipe(
            "merge_method: linear\nmodels: [{model: a}]\nmerge_method: slerp\n", "recipe.yaml"
        )


def test_all_problems_are_reported_together_in_line_order() -> None:
    with pytest.raises(RecipeError) as info:
        parse(
            """
            merge_method: ties
            base_model: org/base+lora+more
            models:
              - model: org/a
                parameters:
                  densty: 0.5
                  weight: 1.0
              - model: org/b
                parameters:
                  density: 1.5
                  weight: [0.2, {filter: mlp, value: 1}]
            dtype: fp16
            chat_tempate: chatml
            """
        )
    err = info.value
    assert [p.line for p in err.problems] == [2, 6, 10, 11, 12, 13]
    lines = str(err).splitlines()
    assert lines[0].startswith("recipe.yaml:2: base_model: a model reference has at most one +")
    assert lines[1].startswith("recipe.yaml:6: models[0].parameters.densty: unknown key")
    assert (
        lines[2]
        == "recipe.yaml:10: models[1].parameters.density: density must be in [0, 1], got 1.5"
    )
    assert lines[3].startswith("recipe.yaml:11: models[1].parameters.weight: a parameter is")
    assert lines[4] == "recipe.yaml:12: dtype: unknown dtype 'fp16'"
    assert lines[5] == "recipe.yaml:13: chat_tempate: unknown key"
    for fix in (
        "did you mean 'density'?",
        "did you mean 'float16'?",
        "did you mean 'chat_template'?",
    ):
        assert fix in err.hint
    assert isinstance(err, KruisingError) and err.message == str(err)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("t: 1.5", r"parameters\.t: t must be in \[0, 1\], got 1\.5"),
        ("t: [0, 0.5, -0.1]", r"parameters\.t\[2\]: t must be in \[0, 1\], got -0\.1"),
        (
            "t: [{filter: mlp, value: 2}]",
            r"parameters\.t\[0\]\.value: t must be in \[0, 1\], got 2",
        ),
        ("t: high", r"parameters\.t: t must be a number, got 'high'"),
        ("weight: 0.5", r"parameters\.weight: unknown key: slerp takes t"),
    ],
)
def test_parameter_values_are_checked(setting: str, match: str) -> None:
    with pytest.raises(KruisingError, match=rf"recipe\.yaml:5: {match}"):
        parse(
            f"""
            merge_method: slerp
            base_model: org/a
            models: [{{model: org/a}}, {{model: org/b}}]
            parameters:
              x: 0
              {setting}
            """.replace("  x: 0\n", "")
        )


def test_density_out_of_range_in_a_model() -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:5: models\[0\]\.parameters\.density: density must be in \[0, 1\], got 1\.5",
    ) as info:
        parse(
            """
            merge_method: ties
            models:
              - model: org/a
                parameters:
                  density: 1.5
                  weight: 1
            base_model: org/base
            """
        )
    assert "fraction" in info.value.hint


def test_numeric_strings_count_as_numbers_like_mergekit() -> None:
    # PyYAML reads 1e-3 as a string; mergekit's float validation accepts it, so do we.
    recipe = parse(
        "merge_method: task_arithmetic\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1e-3}\n"
    )
    assert recipe.models is not None and recipe.models[0].parameters == {"weight": "1e-3"}


def test_unknown_method_parameters_are_not_checked_by_name() -> None:
    recipe = parse(
        "merge_method: my_method\nmodels:\n  - model: a\n    parameters: {whatever: 3}\n"
    )
    assert recipe.merge_method == "my_method"


def test_mixed_parameter_list() -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:4: parameters\.weight: a parameter is .* not a mix, got \[1, \{'value': 2\}\]",
    ):
        parse(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight: [1, {value: 2}]\n"
        )


def test_conditional_parameter_needs_value() -> None:
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:5: parameters\.weight\[0\]\.value: missing required key"
    ):
        parse(
            "merge_method: linear\nmodels: [{model: a}]\nparameters:\n  weight:\n    - filter: mlp\n"
        )


def test_module_needs_one_input_form() -> None:
    with pytest.raises(
        KruisingError,
        match=r"recipe\.yaml:3: modules\.text_decoder: a module has exactly one of slices or models",
    ):
        parse("merge_method: linear\nmodules:\n  text_decoder:\n    parameters: {weight: 1}\n")


def test_modules_form_parses() -> None:
    recipe = parse(
        """
        merge_method: linear
        modules:
          text_decoder:
            models:
              - model: org/a
                parameters: {weight: 0.7}
              - model: org/b
            parameters: {weight: 0.3}
        """
    )
    assert recipe.modules is not None
    assert recipe.referenced_models() == ["org/a", "org/b"]


def test_name_is_accepted_for_mergekit_multi_stages() -> None:
    recipe = parse("name: stage-1\nmerge_method: linear\nmodels: [{model: a}]\n")
    assert recipe.name == "stage-1"


def test_anchors_and_merge_keys_keep_their_lines() -> None:
    recipe = parse(
        """
        merge_method: ties
        base_model: org/base
        models:
          - model: org/a
            parameters: &shared
              density: 0.5
              weight: 0.5
          - model: org/b
            parameters:
              <<: *shared
              weight: 0.3
        """
    )
    assert recipe.models is not None
    assert recipe.models[1].parameters == {"density": 0.5, "weight": 0.3}
    with pytest.raises(
        KruisingError, match=r"recipe\.yaml:10: models\[1\]\.parameters\.weigth: unknown key"
    ):
        parse(
            """
            merge_method: ties
            base_model: org/base
            models:
              - model: org/a
                parameters: &shared
                  density: 0.5
              - model: org/b
                parameters:
                  <<: *shared
                  weigth: 0.3
            """
        )


def test_validate_recipe_from_data_names_the_field() -> None:
    data = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [{"model": "org/a", "parameters": {"density": 2.0, "weight": 1.0}}],
    }
    with pytest.raises(
        KruisingError,
        match=r"^sweep:variant-3: models\[0\]\.parameters\.density: density must be in \[0, 1\], got 2\.0$",
    ):
        validate_recipe(data, "sweep:variant-3")
    data["models"][0]["parameters"]["density"] = 0.4
    assert validate_recipe(data).models[0].parameters == {"density": 0.4, "weight": 1.0}
    with pytest.raises(
        KruisingError, match=r"^<recipe>: a recipe is a mapping of keys, got a list$"
    ):
        validate_recipe([1, 2])  # type: ignore[arg-type]


def test_load_recipe_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kind.yaml"
    path.write_text("merge_method: linear\nmodels: [{model: a}]\ndtyp: float16\n")
    with pytest.raises(KruisingError, match=rf"^{path}:3: dtyp: unknown key"):
        load_recipe(path)


def test_load_recipe_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KruisingError, match=r"recipe not found: .*nope\.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_programmatic_recipes_are_checked_too() -> None:
    with pytest.raises(ValidationError, match="both models and slices|no models, slices"):
        MergeRecipe(merge_method="linear")
    with pytest.raises(ValidationError, match=r"parameters\.densty: unknown key"):
        MergeRecipe(
            merge_method="ties",
            models=[InputModel(model="a", parameters={"densty": 0.5})],
        )


# ----------------------------------------------------------------------------------------------
# Model references, referenced models, YAML out
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("mistralai/Mistral-7B-v0.1", ("mistralai/Mistral-7B-v0.1", None)),
        ("Rijgersberg/GEITje-7B@main", ("Rijgersberg/GEITje-7B", "main")),
        ("org/name@0123abcd", ("org/name", "0123abcd")),
        ("./models/nl", ("./models/nl", None)),
        ("/abs/path/child", ("/abs/path/child", None)),
        ("gpt2", ("gpt2", None)),
    ],
)
def test_parse_model_ref(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_model_ref(ref) == expected


def test_parse_model_ref_refuses_lora() -> None:
    with pytest.raises(
        KruisingError, match=r"LoRA references \(model\+lora\) are not supported here"
    ) as info:
        parse_model_ref("org/a+org/lora")
    assert info.value.hint


def test_referenced_models_base_first_in_order_deduplicated() -> None:
    recipe = parse(
        """
        merge_method: slerp
        slices:
          - sources:
              - model: org/b
                layer_range: [0, 16]
              - model: org/a
                layer_range: [0, 16]
          - sources:
              - model: org/c@v2
                layer_range: [16, 32]
              - model: org/b
                layer_range: [16, 32]
            base_model: org/c@v2
        base_model: org/a
        parameters: {t: 0.5}
        """
    )
    assert recipe.referenced_models() == ["org/a", "org/b", "org/c@v2"]


def test_recipe_to_yaml_round_trips_everything() -> None:
    recipe = load_recipe(HERE / "recipes" / "docs-tokenizer.yml")
    text = recipe_to_yaml(recipe)
    assert parse_recipe(text) == recipe
    assert "chat_template: chatml" in text
    again = parse_recipe(recipe_to_yaml(parse_recipe(text)))
    assert again == recipe


def test_recipe_to_yaml_keeps_numeric_looking_strings() -> None:
    recipe = parse(
        "merge_method: linear\nmodels:\n  - model: '1.0'\n    parameters: {weight: '1e-3'}\n"
    )
    assert parse_recipe(recipe_to_yaml(recipe)) == recipe


# ----------------------------------------------------------------------------------------------
# Parameter resolution: mergekit's semantics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gradient", "t", "expected"),
    [
        ([0, 0.5, 1], 0.25, 0.25),
        ([0, 1], 0.5, 0.5),
        ([0, 1], 0.0, 0.0),
        ([0, 1], 1.0, 1.0),
        ([1, 0.5, 0.7, 0.3, 0], 0.5, 0.7),
        ([1, 0.5, 0.7, 0.3, 0], 0.375, 0.6),  # scaled 1.5: halfway between 0.5 and 0.7
        ([0, 0.3, 0.7, 1], 1 / 3, 0.3),
        ([0.55], 0.8, 0.55),
    ],
)
def test_gradient_interpolation(gradient: list[float], t: float, expected: float) -> None:
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", gradient, t) == pytest.approx(
        expected
    )


def test_non_numeric_gradient_selects() -> None:
    assert evaluate_setting("x", [True, False], 0.4) is True
    assert evaluate_setting("x", [True, False], 1.0) is False
    assert evaluate_setting("x", ["a", "b", "c"], 0.7) == "b"  # int(0.7 * 2) = 1


def test_validate_makes_numeric_strings_interpolate() -> None:
    assert evaluate_setting("x", ["1e-3", "3e-3"], 0.5) == "1e-3"  # as parsed: labels
    assert evaluate_setting("x", ["1e-3", "3e-3"], 0.5, validate=float) == pytest.approx(0.002)


def test_scalars_and_empty_lists() -> None:
    assert evaluate_setting("x", 0.3, 0.9) == 0.3
    assert evaluate_setting("x", True, 0.9) is True
    assert evaluate_setting("x", [], 0.5) is None


def test_filters_first_match_wins() -> None:
    setting = [
        ConditionalParameter(filter="self_attn", value=[0, 1]),
        ConditionalParameter(filter="mlp", value=[1, 0]),
        ConditionalParameter(value=0.5),
    ]
    assert evaluate_setting("model.layers.0.self_attn.q_proj.weight", setting, 0.25) == 0.25
    assert evaluate_setting("model.layers.0.mlp.down_proj.weight", setting, 0.25) == 0.75
    assert evaluate_setting("model.embed_tokens.weight", setting, 0.25) == 0.5
    assert evaluate_setting("model.layers.0.self_attn.mlp", setting, 0.0) == 0  # first one wins


def test_filter_star_and_no_match() -> None:
    assert evaluate_setting("anything", [ConditionalParameter(filter="*", value=2)], 0) == 2
    assert evaluate_setting("anything", ConditionalParameter(filter="mlp", value=2), 0) is None
    assert evaluate_setting("", [{"filter": "mlp", "value": 2}], 0) is None


def test_nearswap_t_is_a_distance_not_a_fraction() -> None:
    body = "merge_method: nearswap\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
    assert parse(body + "parameters:\n  t: 2.5\n").parameters["t"] == 2.5
    with pytest.raises(RecipeError, match=r"recipe.yaml:7: parameters.t: t must be in \[0, inf\)"):
        parse(body + "parameters:\n  t: -0.5\n")


def test_karcher_max_iter_zero_is_accepted_like_mergekit() -> None:
    body = "merge_method: karcher\nmodels:\n  - model: a\n  - model: b\n"
    assert parse(body + "parameters:\n  max_iter: 0\n").parameters["max_iter"] == 0
    with pytest.raises(RecipeError, match="max_iter must be an integer"):
        parse(body + "parameters:\n  max_iter: 2.5\n")
