"""FSDP that runs: recipes/pretrain/accelerate-fsdp.yaml's path (FSDP2, fully_shard) on CPU.

`accelerate launch --config_file recipes/pretrain/accelerate-fsdp.yaml` starts the processes
with the recipe's FSDP settings (FSDP_VERSION=2, one unit per MistralDecoderLayer, reshard after
forward, sharded state dict, CPU-RAM-efficient loading); only the process count and the
precision are changed here (2 CPU processes, float32 so that the losses compare to float noise:
bf16 autocast on CPU runs too, but its loss is not one process's to 1e-4). The processes talk
over gloo; pretrain.train turns accelerate's MULTI_CPU into FSDP when the FSDP config asks, so
the model is sharded, stepped, checkpointed (torch.distributed.checkpoint) and gathered for
the final save exactly as on GPUs. What CPU cannot show: NCCL, bf16 on tensor cores, speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.train import run
from tests.pretrain.test_train import TINY_MODEL, _write_cfg, cfg, tiny

REPO = Path(__file__).resolve().parents[2]
FSDP_RECIPE = REPO / "recipes" / "pretrain" / "accelerate-fsdp.yaml"
TWO_LAYERS = {**TINY_MODEL, "num_hidden_layers": 2}  # two decoder layers: two FSDP units


def launch(config: Path) -> dict:
    """`accelerate launch` the recipe's FSDP config on 2 CPU processes; the main one's result."""
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_RECIPE),
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
         "-m", "pretrain.cli", "run", str(config), "--json"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (FSDP)" in " ".join(proc.stderr.split())
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # only the main process reports
    return results[0]


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_and_resumes_from_a_sharded_checkpoint(
    tmp_path,
):
    import torch
    from transformers import AutoModelForCausalLM

    single = run(cfg(tiny(tmp_path, "single", model=TWO_LAYERS, max_steps=4, micro_batch=4)))

    data = tiny(tmp_path, "fsdp", model=TWO_LAYERS, max_steps=4, micro_batch=2,
                checkpoint_every=2, keep_last=2, progress=True)  # fmt: skip
    sharded = launch(_write_cfg(tmp_path / "fsdp.yaml", data))
    assert sharded["tokens"] == single.tokens
    assert sharded["final_loss"] == pytest.approx(single.final_loss, rel=1e-4)

    # the checkpoint is sharded: one torch.distributed.checkpoint file per process
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000002"
    shards = sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards
    assert (ckpt / "optimizer_0").is_dir()

    # the gathered model loads with from_pretrained and holds one process's weights
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "model")
    theirs = AutoModelForCausalLM.from_pretrained(single.model_dir)
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name

    # resume from step 2 on 2 processes: the same end as the run that was not stopped
    resume = dict(data, resume=str(ckpt))
    del resume["model"]
    resumed = launch(_write_cfg(tmp_path / "resume.yaml", resume))
    assert resumed["steps"] == 4 and resumed["tokens"] == sharded["tokens"]
    assert resumed["final_loss"] == pytest.approx(sharded["final_loss"], rel=1e-5, abs=1e-6)
    rows = [json.loads(r) for r in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
