"""`merge extract-lora --model TUNED --base BASE --rank R --out DIR`: a task vector as a PEFT LoRA.

As mergekit-extract-lora (mergekit 0.1.5) does it: for every ``nn.Linear`` of the model, the
task vector ``tuned - base`` (in the stored dtype) is factored by a truncated SVD in float32,
``delta ~= B @ A`` with ``A = sqrt(S) Vh[:r]`` and ``B = U[:, :r] sqrt(S)`` (``r = min(R, rank of
the matrix)``, fewer with ``--sv-epsilon``), stored in the task vector's dtype as
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``. Embeddings, the LM head and
modules that are not linear (the RMS norms) are saved at full rank from the tuned model
(PEFT's ``modules_to_save``), so applying the adapter to the base gives the tuned model up to
the truncation. ``adapter_config.json`` has ``r`` = the largest rank, ``lora_alpha = r`` (scale
1) and a ``rank_pattern`` / ``alpha_pattern`` for modules of lower rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kruising.console import console
from kruising.errors import KruisingError
from merger.core import output


def decompose(task_vector, max_rank: int, distribute_scale: bool = True, sv_epsilon: float = 0.0):
    """(A, B) with B @ A the best rank-r approximation of ``task_vector`` (mergekit's
    ``TaskVectorDecompositionTask``, in the task vector's dtype)."""
    import torch

    out_dtype = task_vector.dtype
    u, s, vh = torch.linalg.svd(task_vector.to(dtype=torch.float32), full_matrices=False)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int((s > sv_epsilon).sum().item()), rank)
    if distribute_scale:
        sqrt_s = torch.diag(torch.sqrt(s[:rank]))
        scale_a, scale_b = sqrt_s, sqrt_s
    else:
        scale_a, scale_b = torch.diag(s[:rank]), torch.eye(rank, device=s.device)
    weight_a = scale_a @ vh[:rank]
    weight_b = u[:, :rank] @ scale_b
    return weight_a.to(dtype=out_dtype), weight_b.to(dtype=out_dtype)


def _modules(config: dict):
    """(module name, kind) of the model in named_modules order: "linear", "embedding" (the
    input and output embeddings), "other" (a module with a weight that is not linear)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    embed_in, embed_out = model.get_input_embeddings(), model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if module is embed_in or module is embed_out or isinstance(module, nn.Embedding):
            yield name, "embedding"
        elif isinstance(module, nn.Linear):
            yield name, "linear"
        else:
            yield name, "other"


def extract_lora(
    model: str,
    base: str,
    rank: int,
    out: Path,
    *,
    distribute_scale: bool = True,
    sv_epsilon: float = 0.0,
    device: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write the LoRA adapter of ``model``'s task vector over ``base`` into ``out``."""
    import torch
    from safetensors.torch import save_file

    from kruising.device import resolve_device
    from merger.core.io import open_model

    if rank < 1:
        raise KruisingError(f"--rank must be at least 1, got {rank}", "e.g. --rank 64")
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise KruisingError(
            f"output folder {out} already exists", "choose another --out, or pass --overwrite"
        )
    torch_device = resolve_device(device, error=KruisingError)
    tuned, original = open_model(model), open_model(base)
    try:
        vocab = [s.tensors["model.embed_tokens.weight"].shape[0] for s in (tuned, original)]
        if vocab[0] != vocab[1]:
            console.print(
                f"note: vocabularies differ ({vocab[0]} tokens tuned, {vocab[1]} base): the "
                "embeddings are saved at full rank, as always"
            )
        tensors: dict[str, torch.Tensor] = {}
        modules_to_save: list[str] = []
        ranks: dict[str, int] = {}
        plan = list(_modules(tuned.config))
        console.print(
            f"extract-lora: {sum(k == 'linear' for _, k in plan)} linear modules at rank <= "
            f"{rank}, device {torch_device}"
        )
        for name, kind in plan:
            weight, bias = f"{name}.weight", f"{name}.bias"
            if weight not in tuned.tensors:
                continue
            key = name.split(".")[-1]
            if kind != "linear":
                if key not in modules_to_save:
                    modules_to_save.append(key)
                for tensor_name in (weight, bias):
                    if tensor_name in tuned.tensors:
                        tensors[f"base_model.model.{tensor_name}"] = tuned.read(tensor_name).clone()
                continue
            if weight not in original.tensors:
                raise KruisingError(
                    f"{weight} is in {model} but not in {base}",
                    "the base must be the model the fine-tune started from",
                )
            a, b = tuned.read(weight), original.read(weight)
            if a.shape != b.shape:
                raise KruisingError(
                    f"{weight}: {model} has {tuple(a.shape)}, {base} has {tuple(b.shape)}",
                    "the base must be the model the fine-tune started from",
                )
            delta = a.to(torch_device) - b.to(torch_device)
            weight_a, weight_b = decompose(delta, rank, distribute_scale, sv_epsilon)
            tensors[f"base_model.model.{name}.lora_A.weight"] = weight_a.cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = weight_b.cpu().contiguous()
            ranks[name] = weight_a.shape[0]
            if bias in tuned.tensors:
                tensors[f"base_model.model.{name}.lora_B.bias"] = tuned.read(bias) - original.read(
                    bias
                )
            tuned.release(weight)
            original.release(weight)
        if not ranks:
            raise KruisingError(f"{model} has no linear modules to factor", "check --model")
        top = max(ranks.values())
        lower = {k: v for k, v in ranks.items() if v != top}
        config = {
            "base_model_name_or_path": base,
            "peft_type": "LORA",
            "use_rslora": False,
            "target_modules": sorted({k.split(".")[-1] for k in ranks}),
            "modules_to_save": modules_to_save,
            "task_type": "CAUSAL_LM",
            "r": top,
            "lora_alpha": top,
            "rank_pattern": lower,
            "alpha_pattern": lower,
            "lora_dropout": 0.0,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }
        tmp = output.prepare(
            out, overwrite=overwrite, inputs=[tuned.path, original.path], what="adapter"
        )
        try:
            save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=4) + "\n")
            (tmp / "README.md").write_text(_card(model, base, top, modules_to_save))
            output.commit(tmp, out, overwrite=overwrite, what="adapter")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        tuned.close()
        original.close()
    size = (out / "adapter_model.safetensors").stat().st_size
    console.print(f"wrote {out} (LoRA rank {top}, {size / 1e6:.1f} MB)")
    return out


def _card(model: str, base: str, rank: int, modules_to_save: list[str]) -> str:
    import yaml

    front = yaml.safe_dump(
        {
            "base_model": base,
            "library_name": "peft",
            "tags": ["lora", "merge", "mergekit", "kruising"],
        },
        sort_keys=False,
    )
    return (
        f"---\n{front}---\n\n# LoRA extracted from `{model}`\n\n"
        f"The task vector `{model}` − `{base}` of every linear module, factored by a truncated "
        f"SVD at rank ≤ {rank} (`merge extract-lora`, as mergekit-extract-lora does it). "
        f"Saved at full rank: {', '.join(modules_to_save) or 'nothing'}.\n\n"
        "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        'model = PeftModel.from_pretrained(base, "THIS_FOLDER").merge_and_unload()\n```\n'
    )
