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
    c = load_config(REPO / "recipes" / "pretrain" / "geitje-7b.yaml")
    assert (c.context_length, c.lr, c.schedule, c.warmup_fraction) == (8192, 2e-5, "cosine", 0.1)
    assert c.micro_batch * c.grad_accum * 8 == 128  # sequences per step on 8 GPUs
    assert c.dtype == "bfloat16" and c.gradient_checkpointing
    assert c.attn_implementation == "flash_attention_2"
    assert c.init_from == "mistralai/Mistral-7B-v0.1"
    assert c.total_steps(world_size=8) == 9537


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
