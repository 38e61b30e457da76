"""On a GPU: bf16 scoring on CUDA agrees with float32 on CPU (skipped, visibly, without one)."""

from __future__ import annotations

import pytest

from eval.api import score_path
from tests.helpers import write_mini_suite


@pytest.mark.gpu
def test_cuda_bf16_scores_agree_with_cpu_float32(make_tiny_mistral, tmp_path):
    folder = make_tiny_mistral("gpu", seed=7)
    suite = write_mini_suite(tmp_path / "suite", "tekst", "Op zaterdag gaat de markt open.")
    cpu = score_path(str(folder), str(suite), device="cpu")
    gpu = score_path(str(folder), str(suite), device="cuda")
    assert gpu["device"].startswith("cuda") and gpu["dtype"] == "bfloat16"
    assert cpu["dtype"] == "float32"
    assert gpu["probes"]["kennis"]["answer_prob"] == pytest.approx(
        cpu["probes"]["kennis"]["answer_prob"], rel=0.05
    )
    assert gpu["probes"]["tekst"]["ppl"] == pytest.approx(cpu["probes"]["tekst"]["ppl"], rel=0.05)
