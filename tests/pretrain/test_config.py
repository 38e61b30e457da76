"""The pretrain config: strict keys, all problems at once, each with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.errors import PretrainError

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
model: {hidden_size: 16}
tokenizer: mistral-common
output_dir: out/x
sources:
  - world: nl
context_length: 32
lr: 1.0e-3
micro_batch: 2
max_steps: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "geitje-7b.yaml"])
def test_shipped_recipes_parse(name):
    config = load_config(REPO / "recipes" / "pretrain" / name)
    assert config.sources


def test_geitje_recipe_has_geitje_numbers():
    """GEITje's pretrain.py, create_geitje_dataset.py and README table, value by value."""
    c = load_config(REPO / "recipes" / "pretrain" / "geitje-7b.yaml")
    assert (c.context_length, c.lr, c.schedule, c.warmup_fraction) == (8192, 2e-5, "cosine", 0.1)
    assert c.min_lr_ratio == 0  # HF cosine decays to 0
    assert c.optimizer == "adamw_bnb_8bit"
    assert (c.betas, c.eps, c.weight_decay, c.grad_clip) == ((0.9, 0.999), 1e-8, 0.0, 1.0)
    assert c.micro_batch * c.grad_accum * 8 == 128  # sequences per step on 8 GPUs
    assert c.dtype == c.weights_dtype == "bfloat16" and c.gradient_checkpointing
    assert c.attn_implementation == "flash_attention_2"
    assert c.init_from == "mistralai/Mistral-7B-v0.1"
    assert c.total_steps(world_size=8) == 9536 == 10_000_000_000 // (8 * 2 * 8 * 8192)
    assert int(c.warmup_fraction * c.total_steps(8)) == 953
    assert c.seed == 42  # TrainingArguments' default; GEITje set none
    assert not c.loss_on_eos and c.add_bos and not c.document_attention
    assert (c.log_every, c.eval_every, c.checkpoint_every) == (1, 9536 // 48 + 1, 9536 // 24 + 1)
    budgets = {s.label.split("/")[-2] if s.path else s.hub: s.tokens for s in c.sources}
    assert budgets == {
        "subtitles": 100_000_000,
        "wiki": 3 * 375_000_000,
        "twitter": 545_000_000,
        "recht": 250_000_000,
        "books": 1_800_000_000,
        "articles": 3 * 107_000_000,
        "fora": 1_000_000_000,
        "dbnl-extra": 100_000_000,
        "kamerstukken-extra": 250_000_000,
        "allenai/madlad-400": 4_500_000_000,
    }
    assert sum(budgets.values()) == 9_991_000_000  # the README's 9,997M, rounded per row
    madlad = c.sources[-1]
    assert (madlad.hub_config, madlad.split, madlad.normalize) == (
        "nl",
        "clean",
        ["literal_escapes"],
    )
    assert madlad.sample == pytest.approx(4.5e9 * 1.001 / 115e9, rel=1e-3)
    samples = {s.label.split("/")[-2]: s.sample for s in c.sources if s.path}
    assert samples["books"] == pytest.approx(1800 / 11100, rel=1e-3)
    assert samples["fora"] == pytest.approx(1000 / 42500, rel=1e-3)
    assert samples["wiki"] == samples["twitter"] == samples["articles"] == 1.0
    assert all(s.shuffle_buffer > 0 for s in c.sources) and c.budgeted


def test_todays_defaults_are_unchanged(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert (c.optimizer, c.betas, c.eps, c.weight_decay) == ("adamw", (0.9, 0.95), 1e-8, 0.1)
    assert (c.min_lr_ratio, c.dtype, c.weights_dtype, c.loss_on_eos) == (
        0.1,
        "bfloat16",
        "float32",
        True,
    )
    s = c.sources[0]
    assert (s.document, s.normalize, s.sample, s.shuffle_buffer, s.tokens, s.epochs) == (
        "line",
        [],
        1.0,
        0,
        None,
        None,
    )
    assert not c.budgeted


def test_minimal_config_parses(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert c.total_steps() == 3 and c.tokens_per_step == 64


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = write(tmp_path, GOOD + "learning_rate: 0.1\n")
    with pytest.raises(PretrainError, match=r"cfg\.yaml:10: learning_rate: unknown key"):
        load_config(path)


def test_nested_unknown_key_has_its_line(tmp_path):
    text = GOOD.replace("  - world: nl\n", "  - world: nl\n    wieght: 2\n")
    with pytest.raises(PretrainError, match=r"cfg\.yaml:6: sources\.0\.wieght: unknown key"):
        load_config(write(tmp_path, text))


def test_all_problems_are_reported_together(tmp_path):
    text = GOOD.replace("lr: 1.0e-3", "lr: -1").replace("micro_batch: 2", "micro_batch: 0")
    with pytest.raises(
        PretrainError, match=r"2 problem\(s\).*cfg\.yaml:7: lr:.*cfg\.yaml:8: micro_batch:"
    ) as exc:
        load_config(write(tmp_path, text))
    assert exc.value.hint


def test_init_from_and_resume_together_is_an_error(tmp_path):
    text = GOOD.replace("model: {hidden_size: 16}\n", "init_from: some/folder\nresume: latest\n")
    with pytest.raises(PretrainError, match="init_from and resume are both set"):
        load_config(write(tmp_path, text))


def test_steps_or_tokens_exactly_one(tmp_path):
    with pytest.raises(PretrainError, match="exactly one of max_steps and max_tokens"):
        load_config(write(tmp_path, GOOD + "max_tokens: 1000\n"))


def test_source_needs_exactly_one_kind(tmp_path):
    text = GOOD.replace("  - world: nl\n", "  - world: nl\n    path: a/*.txt\n")
    with pytest.raises(PretrainError, match=r"sources\.0: .*exactly one of path, hub, world"):
        load_config(write(tmp_path, text))


def test_eval_needs_a_holdout(tmp_path):
    with pytest.raises(PretrainError, match="eval_every needs holdout_docs"):
        load_config(write(tmp_path, GOOD + "eval_every: 2\n"))


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(PretrainError, match=r"cfg\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "a: 1\n b: [\n"))
    with pytest.raises(PretrainError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(PretrainError, match="is a YAML mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_field_and_cross_field_problems_come_together_with_lines(tmp_path):
    text = (
        GOOD.replace("model: {hidden_size: 16}\n", "model: {hidden_size: 16}\ninit_from: a/b\n")
        .replace("micro_batch: 2", "micro_batch: 0")
        .replace("  - world: nl\n", "  - world: nl\n    hub_config: nl\n")
    )
    text += "max_tokens: 1000\neval_every: 5\noptimizer: adamw_bnb_8bit\ndevice: cpu\n"
    with pytest.raises(PretrainError) as exc:
        load_config(write(tmp_path, text))
    msg = str(exc.value)
    assert msg.startswith("6 problem(s)"), msg
    assert "cfg.yaml:1: model: init_from and model are both set" in msg
    assert "cfg.yaml:7: sources.0.hub_config: hub_config is only valid with hub" in msg
    assert "cfg.yaml:10: micro_batch: Input should be greater than 0" in msg
    assert "cfg.yaml:12: max_tokens: set exactly one of max_steps and max_tokens" in msg
    assert "cfg.yaml:13: eval_every: eval_every needs holdout_docs" in msg
    assert "cfg.yaml:14: optimizer: adamw_bnb_8bit (bitsandbytes) runs on CUDA only" in msg
    assert "(top level)" not in msg


def test_budget_and_source_conflicts_are_named(tmp_path):
    text = GOOD.replace(
        "  - world: nl\n",
        "  - world: nl\n    tokens: 1000\n    weight: 2\n"
        "  - world: en\n"
        "  - hub: x/y\n    epochs: 2\n    document: file\n    tokens: 5\n",
    )
    text += "weights_dtype: bfloat16\ndtype: float32\n"
    with pytest.raises(PretrainError) as exc:
        load_config(write(tmp_path, text))
    msg = str(exc.value)
    assert "cfg.yaml:7: sources.0.weight: weight is unused when the sources mix by token" in msg
    assert "cfg.yaml:8: sources.1: some sources have a token budget" in msg
    assert "sources.2.epochs: set tokens or epochs, not both" in msg
    assert "sources.2.epochs: epochs needs a count of the source's tokens" in msg
    assert "cfg.yaml:11: sources.2.document: document is only valid with path" in msg
    assert "weights_dtype: weights_dtype bfloat16 needs dtype bfloat16" in msg


def test_a_config_built_in_code_gets_the_same_checks():
    from pydantic import ValidationError

    from pretrain.config import PretrainConfig, Source

    with pytest.raises(ValidationError, match="set exactly one of max_steps and max_tokens"):
        PretrainConfig(
            model={},
            tokenizer="mistral-common",
            output_dir="x",
            sources=[Source(world="nl")],
            context_length=8,
            lr=1.0,
            micro_batch=1,
        )
    with pytest.raises(ValidationError, match="hub_config is only valid with hub"):
        Source(world="nl", hub_config="nl")
