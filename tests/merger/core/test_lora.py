"""`merge extract-lora`: a task vector as a PEFT LoRA adapter, as mergekit-extract-lora makes it."""

from __future__ import annotations

import json

import pytest
import torch

from kruising.errors import KruisingError
from merger.core.lora import extract_lora
from tests.helpers import load_tensors


@pytest.fixture(scope="module")
def pair(make_tiny_mistral):
    """A base and a fine-tune of it (base + a task vector of full rank), float32 and bf16."""
    from safetensors.torch import save_file

    out = {}
    for dtype in ("float32", "bfloat16"):
        base = make_tiny_mistral(f"lora-base-{dtype}", seed=40, dtype=dtype)
        tuned = base.parent / f"lora-tuned-{dtype}"
        if not tuned.exists():
            import shutil

            shutil.copytree(base, tuned)
            g = torch.Generator().manual_seed(41)
            tensors = {
                name: (t.float() + 0.02 * torch.randn(t.shape, generator=g)).to(t.dtype)
                for name, t in load_tensors(base).items()
            }
            save_file(tensors, str(tuned / "model.safetensors"), metadata={"format": "pt"})
        out[dtype] = (base, tuned)
    return out


def test_the_adapter_is_mergekit_extract_loras(pair, tmp_path):
    from mergekit.scripts.extract_lora import main

    base, tuned = pair["bfloat16"]
    ours = extract_lora(str(tuned), str(base), 8, tmp_path / "ours", device="cpu")
    main.main(
        ["--model", str(tuned), "--base-model", str(base), "--out-path", str(tmp_path / "theirs"),
         "--max-rank", "8"],
        standalone_mode=False,
    )  # fmt: skip
    mine = load_tensors(ours)
    ref = load_tensors(tmp_path / "theirs")
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        assert mine[name].dtype == expected.dtype, name
        assert torch.equal(mine[name], expected), name
    a = json.loads((ours / "adapter_config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert set(a["target_modules"]) == set(b["target_modules"])
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "modules_to_save", "peft_type"):
        assert a[key] == b[key], key


def _applied(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def test_peft_applies_it_and_the_error_falls_with_the_rank(pair, tmp_path):
    """Base + adapter against the tuned model: the linear weights' error falls as the rank
    grows, and at full rank (the tiny model's 32) the tuned model comes back."""
    from transformers import AutoModelForCausalLM

    base, tuned = pair["float32"]
    target = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.float32)
    want = dict(target.state_dict())
    ids = torch.tensor([[1, 415, 2936, 9060, 285, 1142, 28723]])
    with torch.no_grad():
        want_logits = target(ids).logits
    errors = []
    for rank in (2, 8, 32):
        adapter = extract_lora(str(tuned), str(base), rank, tmp_path / f"r{rank}", device="cpu")
        merged = _applied(base, adapter)
        got = merged.state_dict()
        linear = [n for n in want if "proj" in n]
        errors.append(sum(float((got[n] - want[n]).norm()) for n in linear))
        for n in want:  # embeddings, head and norms are saved at full rank: exact
            if "proj" not in n:
                assert torch.equal(got[n], want[n]), n
        if rank == 32:
            for n in linear:
                torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(merged(ids).logits, want_logits, rtol=1e-4, atol=1e-4)
    assert errors[0] > errors[1] > errors[2]
    config = json.loads((tmp_path / "r8" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    assert set(config["modules_to_save"]) == {
        "embed_tokens", "input_layernorm", "post_attention_layernorm", "norm", "lm_head"
    }  # fmt: skip


def test_bad_arguments_are_one_line_errors(pair, tmp_path, make_tiny_mistral):
    base, tuned = pair["float32"]
    with pytest.raises(KruisingError, match="--rank must be at least 1"):
        extract_lora(str(tuned), str(base), 0, tmp_path / "x", device="cpu")
    wider = make_tiny_mistral("lora-wider", seed=1, hidden_size=48, head_dim=12)
    with pytest.raises(KruisingError, match=r"has \(32, 32\)|has \(48, 48\)"):
        extract_lora(str(tuned), str(wider), 4, tmp_path / "y", device="cpu")
    assert not (tmp_path / "y").exists()
