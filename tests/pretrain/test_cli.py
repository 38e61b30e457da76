"""The `pretrain` console script: light to import, errors as `error:` + `hint:` with exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pretrain(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pretrain.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"NO_COLOR": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


def test_cli_module_does_not_import_torch():
    code = "import sys, pretrain.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_help_lists_the_commands():
    proc = pretrain("--help")
    assert proc.returncode == 0
    assert "run" in proc.stdout and "family" in proc.stdout


def test_bad_config_prints_error_and_hint(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "output_dir: x\nsources: [{world: nl}]\ncontext_length: 8\nlr: 1\nmicro_batch: 1\nmax_step: 3\n"
    )
    proc = pretrain("run", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ")
    assert "bad.yaml:6: max_step: unknown key" in proc.stderr
    assert "\nhint: " in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_tiny_run_on_cuda_in_bf16(tmp_path):
    from pretrain.config import parse_config
    from pretrain.train import run

    config = parse_config(
        {
            "model": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "intermediate_size": 128,
            },
            "tokenizer": "mistral-common",
            "output_dir": str(tmp_path / "gpu"),
            "sources": [{"world": "nl", "documents": 500}],
            "context_length": 128,
            "micro_batch": 8,
            "max_steps": 10,
            "lr": 3e-3,
            "dtype": "bfloat16",
            "device": "cuda",
            "progress": False,
        },
        "gpu-test",
    )
    result = run(config)
    assert result.final_loss < 10.4 and result.tokens_per_s > 0
