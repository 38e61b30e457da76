"""The training loop: outputs, determinism, bad input, checkpoints, SIGKILL + resume, 2 processes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.config import parse_config
from pretrain.errors import PretrainError
from pretrain.train import checkpoints, lr_factor, run

REPO = Path(__file__).resolve().parents[2]
TINY_MODEL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 64,
}


def tiny(tmp_path: Path, name: str = "run", **overrides) -> dict:
    settings = {
        "model": TINY_MODEL,
        "tokenizer": "mistral-common",
        "output_dir": str(tmp_path / name),
        "sources": [{"world": "nl", "documents": 300}, {"world": "en", "documents": 100}],
        "context_length": 32,
        "micro_batch": 4,
        "max_steps": 6,
        "lr": 5e-3,
        "dtype": "float32",
        "device": "cpu",
        "log_every": 2,
        "progress": False,
        "plot": False,
    }
    settings.update(overrides)
    return settings


def cfg(data: dict):
    return parse_config(data, "test.yaml")


def test_run_writes_a_loadable_model_metrics_and_plot(tmp_path):
    result = run(cfg(tiny(tmp_path, plot=True, holdout_docs=20, eval_every=3, eval_batches=1)))
    out = tmp_path / "run"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert type(model).__name__ == "MistralForCausalLM"
    assert len(AutoTokenizer.from_pretrained(result.model_dir)) == 32000
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 0, "tokens": 0, "eval_loss": rows[0]["eval_loss"]}  # step-0 eval
    rows = rows[1:]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["tokens"] == 6 * 4 * 32 == result.tokens
    assert "tokens_per_s" in rows[1] and "eval_loss" in rows[2] and "eval_loss" in rows[5]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000
    assert result.tokens_per_s > 0 and result.mfu is None  # no MFU on a CPU


def test_training_is_deterministic_for_a_seed(tmp_path):
    a = run(cfg(tiny(tmp_path, "a", max_steps=3)))
    b = run(cfg(tiny(tmp_path, "b", max_steps=3)))
    c = run(cfg(tiny(tmp_path, "c", max_steps=3, seed=1)))
    assert a.final_loss == b.final_loss != c.final_loss


def test_lr_schedule_shapes():
    assert lr_factor(0, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(80, 100, 10, "constant", 0.1) == 1.0


def test_context_longer_than_the_model_is_refused(tmp_path):
    with pytest.raises(
        PretrainError,
        match="context_length 128 is longer than the model's max_position_embeddings 64",
    ):
        run(cfg(tiny(tmp_path, context_length=128)))


def test_tokenizer_and_model_vocab_must_agree(tmp_path):
    with pytest.raises(
        PretrainError, match="tokenizer has 32000 tokens but the model's vocab_size is 1000"
    ):
        run(cfg(tiny(tmp_path, model={**TINY_MODEL, "vocab_size": 1000})))


def test_missing_corpus_and_init_from(tmp_path):
    with pytest.raises(PretrainError, match="no files match"):
        run(cfg(tiny(tmp_path, sources=[{"path": str(tmp_path / "none/*.jsonl")}])))
    data = tiny(tmp_path, init_from=str(tmp_path / "nothing-here"))
    del data["model"], data["tokenizer"]
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(PretrainError, match="not a local folder and HF_HUB_OFFLINE is set"):
            run(cfg(data))
    finally:
        del os.environ["HF_HUB_OFFLINE"]


def test_cuda_asked_without_a_gpu_is_an_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PretrainError, match="device: cuda, but no CUDA GPU is visible"):
        run(cfg(tiny(tmp_path, device="cuda")))


def test_checkpoints_keep_last_k_and_resume_requires_one(tmp_path):
    run(cfg(tiny(tmp_path, max_steps=7, checkpoint_every=2, keep_last=2)))
    root = tmp_path / "run" / "checkpoints"
    # every 2nd step and the final one (7), the last 2 kept
    assert [p.name for p in checkpoints(root)] == ["step-00000006", "step-00000007"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    data = tiny(tmp_path, "other", resume="latest")
    del data["model"]
    with pytest.raises(PretrainError, match="holds no complete checkpoint"):
        run(cfg(data))


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run(cfg(tiny(tmp_path, max_steps=3, checkpoint_every=2)))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    data = tiny(tmp_path, resume=str(ckpt), max_steps=3)
    del data["model"]
    with pytest.raises(PretrainError, match="resume: cannot load checkpoint .*step-00000002"):
        run(cfg(data))
    (ckpt / "trainer_state.json").write_text("{truncated")
    with pytest.raises(PretrainError, match="trainer_state.json is corrupt"):
        run(cfg(data))


def test_a_failed_run_keeps_the_last_good_checkpoint_and_model(tmp_path):
    good = run(cfg(tiny(tmp_path, max_steps=4, checkpoint_every=2)))
    before = (good.model_dir / "model.safetensors").read_bytes()
    # same output_dir, a learning rate that blows the loss up: the run must fail ...
    with pytest.raises(PretrainError, match="loss became nan"):
        run(cfg(tiny(tmp_path, max_steps=8, checkpoint_every=2, lr=1e30, grad_clip=None)))
    # ... and leave the previous model and last complete checkpoint untouched
    assert (good.model_dir / "model.safetensors").read_bytes() == before
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "trainer_state.json").is_file()


def _write_cfg(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_sigkill_then_resume_ends_at_the_same_loss(tmp_path):
    steps = 24
    reference = run(cfg(tiny(tmp_path, "reference", max_steps=steps, document_attention=True)))

    data = tiny(
        tmp_path,
        "killed",
        max_steps=steps,
        checkpoint_every=4,
        keep_last=3,
        document_attention=True,
    )
    config = _write_cfg(tmp_path / "killed.yaml", data)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pretrain.cli", "run", str(config)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    root = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (root / "step-00000008").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model").exists()  # it really died before the end

    resume = dict(data, resume="latest")
    del resume["model"]
    resumed = run(cfg(resume))
    assert resumed.steps == steps and resumed.tokens == reference.tokens
    assert resumed.final_loss == pytest.approx(reference.final_loss, rel=1e-4, abs=1e-5)
    rows = [
        json.loads(line)
        for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # no duplicated steps


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """The multi-process path on CPU: 2 processes x micro_batch 2 == 1 process x micro_batch 4.

    Launched with torchrun, which is what `accelerate launch --multi_gpu` runs underneath:
    `accelerate launch --cpu` starts one process unless MPI is set up, and on CPU accelerate
    runs DDP over gloo (MULTI_CPU) and ignores FSDP settings, so FSDP itself is a GPU check.
    """
    single = run(cfg(tiny(tmp_path, "single", max_steps=4, micro_batch=4)))
    data = tiny(tmp_path, "double", max_steps=4, micro_batch=2, checkpoint_every=2, progress=True)
    config = _write_cfg(tmp_path / "double.yaml", data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "pretrain.cli",
            "run",
            str(config),
            "--json",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU)" in " ".join(proc.stderr.split())
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1  # only the main process reports
    assert results[0]["tokens"] == single.tokens
    assert results[0]["final_loss"] == pytest.approx(single.final_loss, rel=1e-4)
    ckpt = tmp_path / "double" / "checkpoints" / "step-00000002"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ckpt.iterdir()}


def test_the_bar_and_the_summary_show_the_same_tokens_per_second(tmp_path, capsys):
    """The bar's last tok/s is the summary's training tokens/s (eval and checkpoints out)."""
    import re

    settings = tiny(tmp_path, progress=True, max_steps=6, holdout_docs=20, eval_every=3)
    result = run(cfg({**settings, "eval_batches": 1, "checkpoint_every": 3}))
    err = capsys.readouterr().err
    bar = re.findall(r"([\d,]+) tok/s", err)
    summary = re.search(r"([\d,]+) tokens/s\s+training", err)
    assert bar and summary, err
    assert bar[-1] == summary.group(1) == f"{result.tokens_per_s:,.0f}"


# ---- resume compares configs; the final step is a checkpoint; extension from the end ----------


def _resume(tmp_path, name="run", **overrides):
    data = tiny(tmp_path, name, resume="latest", **overrides)
    del data["model"]
    return cfg(data)


def test_resume_with_a_changed_trajectory_is_an_error_naming_the_keys(tmp_path):
    run(cfg(tiny(tmp_path, max_steps=4, checkpoint_every=2)))
    (tmp_path / "run" / "checkpoints" / "step-00000004").rename(tmp_path / "final")
    with pytest.raises(PretrainError) as exc:
        run(_resume(tmp_path, max_steps=4, lr=1e-2, context_length=16))
    msg = str(exc.value)
    assert "changes 2 key(s)" in msg and "context_length 32 -> 16" in msg
    assert "lr 0.005 -> 0.01" in msg and "--allow-config-change" in exc.value.hint
    with pytest.raises(PretrainError, match=r"sources\[1\]\.weight 1\.0 -> 2\.0"):
        sources = [
            {"world": "nl", "documents": 300},
            {"world": "en", "documents": 100, "weight": 2},
        ]
        run(_resume(tmp_path, max_steps=4, sources=sources))
    with pytest.raises(PretrainError, match=r"changes 1 key\(s\).*max_steps 4 -> 6"):
        run(_resume(tmp_path, max_steps=6))  # mid-run: a longer schedule reshapes the rest
    # what does not change the training may change: logging, plots, checkpoint cadence
    result = run(_resume(tmp_path, max_steps=4, log_every=1, plot=True, checkpoint_every=1))
    assert result.steps == 4


def test_allow_config_change_goes_on_with_the_new_values_and_records_them(tmp_path):
    run(cfg(tiny(tmp_path, max_steps=4, checkpoint_every=2)))
    (tmp_path / "run" / "checkpoints" / "step-00000004").rename(tmp_path / "final")
    run(_resume(tmp_path, max_steps=4, lr=2e-3, checkpoint_every=2), allow_config_change=True)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    note = [r for r in rows if "config_change" in r]
    assert note == [{"step": 2, "tokens": 2 * 128, "config_change": {"lr": [0.005, 0.002]}}]
    assert [r["lr"] for r in rows if r.get("step") == 3][0] < 0.002 + 1e-12  # the new peak
    state = json.loads(
        (tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json").read_text()
    )
    assert state["config_changes"] == [{"step": 2, "changes": {"lr": [0.005, 0.002]}}]
    assert state["config"]["lr"] == 0.002


def test_a_finished_run_is_extended_from_its_final_checkpoint(tmp_path):
    first = run(cfg(tiny(tmp_path, max_steps=4, checkpoint_every=3, schedule="constant")))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in checkpoints(root)] == ["step-00000003", "step-00000004"]
    longer = run(_resume(tmp_path, max_steps=7, checkpoint_every=3, schedule="constant"))
    assert longer.steps == 7 and longer.tokens == first.tokens * 7 // 4
    # the same as one 7-step run with a constant lr
    whole = run(cfg(tiny(tmp_path, "whole", max_steps=7, checkpoint_every=3, schedule="constant")))
    assert longer.final_loss == pytest.approx(whole.final_loss, rel=1e-4, abs=1e-5)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[4] == {"step": 4, "tokens": 4 * 128, "config_change": {"max_steps": [4, 7]}}
    with pytest.raises(PretrainError, match="shorter than the checkpoint's step 7"):
        run(_resume(tmp_path, max_steps=5, schedule="constant"))


def test_resuming_a_complete_run_says_so_and_reports_its_stored_losses(tmp_path, capsys):
    from typer.testing import CliRunner

    from pretrain.cli import app

    settings = {"max_steps": 4, "checkpoint_every": 2, "holdout_docs": 20, "eval_every": 2}
    first = run(cfg(tiny(tmp_path, **settings)))
    model = tmp_path / "run" / "model" / "model.safetensors"
    written = model.stat().st_mtime_ns
    capsys.readouterr()
    again = run(_resume(tmp_path, **settings))
    said = " ".join(capsys.readouterr().err.split())
    assert "is already complete: step-00000004 is its final step, 4 of 4" in said
    assert f"final loss {first.final_loss:.4f}, eval loss {first.eval_loss:.4f}" in said
    assert "raise max_steps (or max_tokens)" in said and "writing" not in said
    assert again.already_complete and again.steps == 4 and again.tokens == first.tokens
    assert again.final_loss == round(first.final_loss, 6) and not math.isnan(again.final_loss)
    assert again.eval_loss == round(first.eval_loss, 6) and again.tokens_per_s is None
    assert model.stat().st_mtime_ns == written  # model/ is current: not written again
    # the command exits 0 with the figures in --json
    config = _write_cfg(tmp_path / "resume.yaml", {**tiny(tmp_path, resume="latest", **settings)})
    data = yaml.safe_load(config.read_text())
    del data["model"]
    config.write_text(yaml.safe_dump(data))
    cli = CliRunner().invoke(app, ["run", str(config), "--json"])
    assert cli.exit_code == 0, cli.output
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary["already_complete"] is True and summary["final_loss"] == again.final_loss
    # model/ gone (a crash before it was written): written again from the final checkpoint
    shutil.rmtree(tmp_path / "run" / "model")
    capsys.readouterr()
    rewritten = run(_resume(tmp_path, **settings))
    assert "writing " in " ".join(capsys.readouterr().err.split())
    assert rewritten.already_complete and rewritten.final_loss == again.final_loss
    assert model.is_file()
    # a checkpoint from before losses were stored: the figures come from metrics.jsonl
    state_file = tmp_path / "run" / "checkpoints" / "step-00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["loss"], state["eval_loss"]
    state_file.write_text(json.dumps(state))
    older = run(_resume(tmp_path, **settings))
    assert (older.final_loss, older.eval_loss) == (again.final_loss, again.eval_loss)


def test_eight_bit_adamw_is_a_clear_error_without_cuda_or_bitsandbytes(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PretrainError, match="adamw_bnb_8bit .* needs a CUDA GPU"):
        run(cfg(tiny(tmp_path, optimizer="adamw_bnb_8bit", device="auto")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(PretrainError, match="needs the bitsandbytes package"):
        run(cfg(tiny(tmp_path, optimizer="adamw_bnb_8bit", device="auto")))


def test_bf16_weights_are_trained_and_saved_in_bf16(tmp_path):
    """In a subprocess: accelerate's state is per process, and the other tests use float32."""
    import torch
    from safetensors import safe_open

    data = tiny(tmp_path, max_steps=2, dtype="bfloat16", weights_dtype="bfloat16", progress=True)
    config = _write_cfg(tmp_path / "bf16.yaml", data)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "run", str(config), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    with safe_open(str(Path(result["model_dir"]) / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert dtypes == {torch.bfloat16} and math.isfinite(result["final_loss"])
    assert "bfloat16 (weights bfloat16), adamw" in " ".join(proc.stderr.split())


def test_loss_on_eos_false_masks_eos_targets():
    import torch

    from pretrain.train import _labels

    ids = torch.tensor([[1, 5, 6, 2, 1, 7, 2]])
    masked = _labels(ids, cfg(tiny(Path("/tmp"), loss_on_eos=False)), eos=2)
    assert masked.tolist() == [[1, 5, 6, -100, 1, 7, -100]]
    assert _labels(ids, cfg(tiny(Path("/tmp"))), eos=2) is ids


def test_a_missing_source_fails_before_the_model_loads(tmp_path, monkeypatch):
    import pretrain.train as train

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train, "_load_model", boom)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(PretrainError, match="empty.jsonl has no documents"):
        run(cfg(tiny(tmp_path, sources=[{"path": str(tmp_path / "empty.jsonl")}])))
    with pytest.raises(PretrainError, match="no files match"):
        run(cfg(tiny(tmp_path, sources=[{"path": str(tmp_path / "none/*.jsonl")}])))
