"""Model cards: the Hub front-matter, the Dutch rule, licenses, scores, the recipe verbatim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from kruising.errors import KruisingError
from merger.core.recipe import parse_recipe
from merger.share.card import (
    build_model_card,
    model_card_text,
    read_front_matter,
    render_child_card,
    update_card_scores,
    write_model_card,
)
from merger.share.hub import recipe_from_card, yaml_blocks

TIES = """\
# Dutch knowledge + instruction following
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1@26bca36
models:
  - model: Rijgersberg/GEITje-7B
    parameters: {density: 0.5, weight: 0.6}
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters: {density: 0.5, weight: 0.4}
parameters:
  normalize: true
dtype: bfloat16
"""

ENGLISH = """\
merge_method: linear
models:
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters: {weight: 0.5}
  - model: teknium/OpenHermes-2.5-Mistral-7B
    parameters: {weight: 0.5}
"""

SCORECARD = {
    "model": "out/child",
    "suite": "nl",
    "probes": {
        "cultuur": {"acc": 0.4, "acc_norm": 0.4667, "n": 150},
        "perplexiteit": {"ppl": 8.25, "bits_per_byte": 0.91, "n": 64},
    },
    "dutch_score": 0.583,
    "english_score": 0.512,
    "seconds": 41.2,
}


def card_for(text: str, **kwargs) -> ModelCard:
    return build_model_card(text, parse_recipe(text), **kwargs)


def test_front_matter_lists_every_parent_tags_and_library():
    card = card_for(TIES)
    data = card.data
    assert data.base_model == [
        "mistralai/Mistral-7B-v0.1",
        "Rijgersberg/GEITje-7B",
        "mistralai/Mistral-7B-Instruct-v0.2",
    ]
    assert data.tags == ["merge", "mergekit", "kruising", "dutch"]
    assert data.language == ["nl", "en"]
    assert data.library_name == "transformers"
    assert data.license is None and data.eval_results is None
    # It is a card the Hub client reads back the same.
    again = ModelCard(str(card))
    assert again.data.to_dict() == data.to_dict()


def test_english_parents_without_dutch_scores_are_not_tagged_dutch():
    data = card_for(ENGLISH).data
    assert "dutch" not in data.tags and data.language is None
    assert card_for(ENGLISH, language=["en"]).data.language == ["en"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scorecard": SCORECARD},  # scored on Dutch probes
        {"language": ["nl"]},  # a parent's card declares Dutch
        {"language": ["nld"]},
    ],
)
def test_dutch_by_scorecard_or_declared_language(kwargs):
    data = card_for(ENGLISH, **kwargs).data
    assert "dutch" in data.tags and data.language[:2] == ["nl", "en"]


def test_english_only_scorecard_does_not_make_it_dutch():
    english = {**SCORECARD, "suite": "en", "dutch_score": None}
    assert "dutch" not in card_for(ENGLISH, scorecard=english).data.tags


@pytest.mark.parametrize(
    "licenses, expected",
    [
        (["apache-2.0", "apache-2.0"], ("apache-2.0", None)),
        (["apache-2.0", "cc-by-nc-4.0"], ("other", "parents-licenses")),
        ([], (None, None)),
    ],
)
def test_license_from_the_parents(licenses, expected):
    card = card_for(TIES, licenses=licenses)
    assert (card.data.license, card.data.license_name) == expected
    if len(set(licenses)) > 1:
        assert "`apache-2.0`, `cc-by-nc-4.0`" in card.text


def test_model_index_and_probe_table_come_from_the_scorecard():
    card = card_for(TIES, scorecard=SCORECARD, model_name="geitje-ties")
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("nl", "dutch_score"): 0.583,
        ("nl", "english_score"): 0.512,
        ("cultuur", "acc"): 0.4,
        ("cultuur", "acc_norm"): 0.4667,
        ("perplexiteit", "ppl"): 8.25,
        ("perplexiteit", "bits_per_byte"): 0.91,
    }
    assert card.data.model_name == "geitje-ties"
    assert "model-index:" in str(card)
    assert "| cultuur | acc_norm | 0.4667 |  | 150 |" in card.text
    assert "| perplexiteit | ppl | 8.25 |  | 64 |" in card.text
    # with error bars: the standard error in its column, never a metric of its own
    with_se = json.loads(json.dumps(SCORECARD))
    with_se["probes"]["cultuur"]["acc_norm_se"] = 0.0407
    with_se["dutch_score_ci"] = [0.55, 0.61]
    card = card_for(TIES, scorecard=with_se, model_name="geitje-ties")
    assert "| cultuur | acc_norm | 0.4667 | 0.0407 | 150 |" in card.text
    assert "(95% interval 0.55–0.61)" in card.text
    assert not any(r.metric_type.endswith("_se") for r in card.data.eval_results)
    assert "dutch_score: **0.583**" in card.text and "in 41.2 s" in card.text


def test_unscored_card_says_how_to_score():
    card = card_for(TIES)
    assert "Not scored yet" in card.text and "merge eval" in card.text
    assert "model-index" not in str(card)


@pytest.mark.parametrize(
    "method, link",
    [
        ("linear", "https://arxiv.org/abs/2203.05482"),
        ("task_arithmetic", "https://arxiv.org/abs/2212.04089"),
        ("ties", "https://arxiv.org/abs/2306.01708"),
        ("dare_ties", "https://arxiv.org/abs/2311.03099"),
        ("dare_linear", "https://arxiv.org/abs/2311.03099"),
    ],
)
def test_method_is_linked_to_its_paper(method, link):
    text = TIES.replace("merge_method: ties", f"merge_method: {method}")
    if method == "linear":
        text = text.replace("base_model: mistralai/Mistral-7B-v0.1@26bca36\n", "")
        text = text.replace("density: 0.5, ", "")
    assert f"]({link})" in card_for(text).text


def test_slerp_links_the_wiki_and_names_the_base():
    text = (
        "merge_method: slerp\nbase_model: a/base\n"
        "models:\n  - model: a/base\n  - model: b/nl-chat\nparameters:\n  t: 0.3\n"
    )
    card = card_for(text)
    assert "[SLERP](https://en.wikipedia.org/wiki/Slerp)" in card.text
    assert "with [a/base](https://huggingface.co/a/base) as the base" in card.text
    assert "dutch" in card.data.tags  # b/nl-chat: the word "nl" in the name


def test_recipe_block_is_the_recipe_exactly_as_given():
    card = card_for(TIES)
    found = recipe_from_card(str(card), "README.md")
    assert found.text == TIES
    first = str(card).splitlines()[found.first_line - 1]
    assert first == "# Dutch knowledge + instruction following"


def test_recipe_with_backticks_keeps_a_fence_that_holds():
    text = ENGLISH + 'chat_template: "```{{ messages }}```"\n'
    card = card_for(text)
    assert recipe_from_card(str(card), "README.md").text == text
    assert [b for _, b in yaml_blocks(str(card))] == [text]


def test_reproduce_section_uses_pull_then_run():
    assert "merge pull <org>/<name> --out recipe.yaml\nmerge run recipe.yaml" in card_for(TIES).text
    pushed = card_for(TIES, repo_id="org/geitje-ties")
    assert "merge pull org/geitje-ties --out recipe.yaml" in pushed.text
    assert "# geitje-ties" in pushed.text


def test_card_for_the_hub_lists_only_hub_parents_as_base_model():
    text = (
        "merge_method: linear\nmodels:\n  - model: ./out/nl\n  - model: org/Mistral-Instruct@v2\n"
    )
    assert card_for(text).data.base_model == ["./out/nl", "org/Mistral-Instruct"]
    pushed = card_for(text, repo_id="me/kind")
    assert pushed.data.base_model == ["org/Mistral-Instruct"]
    assert "`./out/nl` (local folder)" in pushed.text


def _parent(root: Path, name: str, readme: str | None, config: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "mistral"}))
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


@pytest.mark.parametrize(
    "text, kwargs",
    [
        (TIES, {}),
        (ENGLISH, {"language": ["nl", "de"], "licenses": ["apache-2.0", "mit"]}),
        (TIES, {"scorecard": SCORECARD, "model_name": "geitje-ties", "licenses": ["mit"]}),
        (ENGLISH, {"compute": {"choice": "float32", "dtypes": ["float32"], "flag": "x"}}),
    ],
)
def test_card_text_is_what_the_hub_card_writes(text, kwargs, tmp_path):
    """write_model_card writes the text itself (no huggingface_hub.repocard import, 0.3 CPU s
    of every merge): byte for byte what ModelCard(...).save wrote."""
    card = card_for(text, **kwargs)
    card.save(tmp_path / "hub.md")
    assert model_card_text(text, parse_recipe(text), **kwargs) == (
        tmp_path / "hub.md"
    ).read_bytes().decode("utf-8")


def test_write_model_card_reads_local_parents(tmp_path):
    base = _parent(tmp_path, "basis", "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# base\n")
    other = _parent(tmp_path, "vertaald", "---\nlicense: apache-2.0\ntags: [dutch]\n---\n")
    plain = _parent(tmp_path, "zonder-kaart", None, {"model_type": "mistral", "license": "mit"})
    text = (
        f"merge_method: task_arithmetic\nbase_model: {base}\n"
        f"models:\n  - model: {other}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {plain}\n    parameters: {{weight: 0.5}}\n"
    )
    child = tmp_path / ".geitje-ta.kruising-tmp-4242"  # the engine's temporary sibling
    child.mkdir()
    path = write_model_card(child, text, parse_recipe(text))

    assert path == child / "README.md"
    card = ModelCard.load(path)
    assert card.data.base_model == [str(base), str(other), str(plain)]
    assert card.data.license == "other"  # apache-2.0 and mit
    assert "`apache-2.0`, `mit`" in card.text
    assert card.data.language == ["nl", "en"] and "dutch" in card.data.tags
    assert "\n# geitje-ta\n" in card.text and "kruising-tmp" not in str(card)
    assert f"`{other}` (local folder)" in card.text
    assert read_front_matter(path)["library_name"] == "transformers"


def test_update_card_scores_keeps_what_the_first_card_declared(tmp_path):
    base = _parent(tmp_path, "basis", "---\nlicense: apache-2.0\n---\n")
    text = f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: org/Mistral-Instruct\n"
    child = tmp_path / "kind"
    child.mkdir()
    (child / "mergekit_config.yml").write_text(text)
    write_model_card(child, text, parse_recipe(text))
    assert ModelCard.load(child / "README.md").data.license == "apache-2.0"

    for item in base.iterdir():  # the parent is gone by the time the child is scored
        item.unlink()
    base.rmdir()
    update_card_scores(child, SCORECARD)

    card = ModelCard.load(child / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.model_name == "kind"
    assert {r.metric_type for r in card.data.eval_results} >= {"dutch_score", "acc_norm"}
    assert "dutch" in card.data.tags  # scored on Dutch probes
    assert recipe_from_card(str(card), "README.md").text == text


def test_render_child_card_finds_the_scorecard_of_merge_eval(tmp_path):
    text = ENGLISH
    child = tmp_path / "kind"
    (child / "kind").mkdir(parents=True)  # merge eval --out CHILD writes CHILD/<model>/
    (child / "mergekit_config.yml").write_text(text)
    (child / "kind" / "scorecard.json").write_text(json.dumps(SCORECARD))
    card = render_child_card(child)
    assert card.data.eval_results and "| cultuur | acc | 0.4 |  | 150 |" in card.text


def test_child_without_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(KruisingError, match="has no mergekit_config.yml"):
        render_child_card(tmp_path)


def test_invalid_scorecard_is_a_clear_error(tmp_path):
    (tmp_path / "mergekit_config.yml").write_text(ENGLISH)
    (tmp_path / "scorecard.json").write_text("{not json")
    with pytest.raises(KruisingError, match="scorecard.json is not valid JSON"):
        render_child_card(tmp_path)
