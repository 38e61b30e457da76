"""Our multiple-choice acc/acc_norm equal lm-evaluation-harness's on the same items (needs the extra)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eval.api import score_model
from eval.harness import run_lm_eval
from eval.suites import PROBES_DIR

TASK = """\
task: kruising_cultuur_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_choice_scores_equal_lm_eval_on_the_same_items(make_tiny_mistral, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lines = (PROBES_DIR / "nl" / "cultuur.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "cultuur24.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = tmp_path / "data.jsonl"
    shutil.copy(suite / "cultuur24.jsonl", data)
    task = tmp_path / "kruising_cultuur_sample.yaml"
    task.write_text(TASK.format(data=data))

    folder = make_tiny_mistral("lm-eval-parity", seed=11)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ours = score_model(model, tokenizer, str(suite))["probes"]["cultuur24"]
    theirs = run_lm_eval(model, tokenizer, [str(task)], batch_size=4)["results"]
    numbers = theirs["kruising_cultuur_sample"]
    assert ours["acc"] == pytest.approx(numbers["acc,none"], abs=1e-6)
    assert ours["acc_norm"] == pytest.approx(numbers["acc_norm,none"], abs=1e-6)
    assert json.loads(lines[0])["id"] == "cultuur-001"
