"""The non-tensor files of a child folder: config, generation config, tokenizer,
mergekit_config.yml and the provenance record. (The model card lives in `merger.share.card`.)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import shutil
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from kruising.errors import KruisingError
from merger.core.io import TOKENIZER_FILES, ModelSource
from merger.core.plan import MergePlan

PROVENANCE_FILE = "kruising_provenance.json"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_config(plan: MergePlan, folder: Path) -> dict[str, Any]:
    """The donor's config.json with the child's dtype and (for slices) layer count."""
    config = dict(plan.sources[plan.donor].config)
    recipe = plan.recipe
    chosen = recipe.out_dtype or recipe.dtype
    if chosen:
        from merger.core.plan import parse_dtype

        config["dtype"] = dtype_name(parse_dtype(chosen, "out_dtype"))
        config.pop("torch_dtype", None)
    if plan.tokenizer is not None:  # mergekit's _update_config_vocab
        config["vocab_size"] = plan.tokenizer.rows
    if plan.sliced:  # mergekit sets the definition's layer-count key (dotted: a sub-config)
        key = (plan.architecture and plan.architecture.num_layers_key) or "num_hidden_layers"
        *parents, last = key.split(".")
        target = config
        for part in parents:
            target = target[part] = dict(target.get(part) or {})
        target[last] = plan.num_layers
        # per-layer lists follow the layers. mergekit 0.1.5 leaves them as they were, and
        # transformers then refuses its config (`num_hidden_layers` (6) must be equal to the
        # number of `layer_types` (4)) and mergekit stops: its child has no config to match
        for key in ("layer_types",):
            if isinstance(config.get(key), list):
                config[key] = [
                    plan.sources[ref].config[key][index] for ref, index in plan.layer_sources or []
                ]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def write_generation_config(plan: MergePlan, folder: Path, config: dict[str, Any]) -> None:
    donor = plan.sources[plan.donor].path / "generation_config.json"
    if donor.is_file():
        shutil.copyfile(donor, folder / "generation_config.json")
        return
    generated = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generated[key] = config[key]
    (folder / "generation_config.json").write_text(json.dumps(generated, indent=2) + "\n")


def write_tokenizer(plan: MergePlan, folder: Path) -> str | None:
    """The child's tokenizer: the one the plan built (`tokenizer_source`/`tokenizer:`), saved
    as mergekit saves it, or else the donor's files copied; `chat_template` set when asked.

    Every check ran when the plan was built (merger.core.tokenizer). Returns the model ref
    the tokenizer came from, ``"built"`` for a built one, None when no input has one.
    """
    recipe = plan.recipe
    if plan.tokenizer is not None:
        from merger.core.tokenizer import save_tokenizer

        template = _resolve_template(recipe.chat_template, plan)
        save_tokenizer(plan.tokenizer, folder, template)
        return "built"
    donor = plan.base_model or plan.donor
    source = plan.sources[donor]
    copied = [n for n in TOKENIZER_FILES if (source.path / n).is_file()]
    if not copied:
        return None
    for name in copied:
        shutil.copyfile(source.path / name, folder / name)
    if recipe.chat_template:
        _set_chat_template(folder, recipe.chat_template, plan)
    return donor


def _resolve_template(template: str | None, plan: MergePlan) -> str | None:
    """The Jinja text of `chat_template`: ``auto`` is the inputs' most common template."""
    from transformers import AutoTokenizer

    if not template:
        return None
    if template == "auto":
        found = []
        for source in plan.sources.values():
            try:
                tok = AutoTokenizer.from_pretrained(str(source.path))
            except Exception:  # a model without a tokenizer simply has no vote
                continue
            if isinstance(tok.chat_template, str) and tok.chat_template.strip():
                found.append(tok.chat_template.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if "{" not in template:
        return _named_template(template)
    return template


def _set_chat_template(folder: Path, template: str, plan: MergePlan) -> None:
    from transformers import AutoTokenizer

    text = _resolve_template(template, plan)
    if text is None:
        return
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = text
    tokenizer.save_pretrained(str(folder))


def check_chat_template(template: str | None) -> None:
    """Fail before merging when `chat_template` names no known template."""
    if template and template != "auto" and "{" not in template:
        _named_template(template)


def _named_template(name: str) -> str:
    spec = importlib.util.find_spec("mergekit")
    if spec and spec.submodule_search_locations:
        file = Path(spec.submodule_search_locations[0]) / "_data" / "chat_templates"
        file = file / f"{name}.jinja"
        if file.is_file():
            return file.read_text()
    raise KruisingError(
        f"chat_template {name!r} is neither a known template name nor a Jinja template",
        "use auto, alpaca, chatml, llama3, mistral, exaone, or a Jinja string",
    )


def input_fingerprint(source: ModelSource) -> dict[str, Any]:
    """sha256 over each shard's name, size and safetensors header: cheap, and it changes
    whenever a tensor's name, dtype, shape or layout does (not when only values change
    in place — the size and header stay; then compare `mtime`)."""
    digest = hashlib.sha256()
    files = sorted({info.file for info in source.tensors.values()})
    newest = 0.0
    for file in files:
        stat = file.stat()
        newest = max(newest, stat.st_mtime)
        digest.update(file.name.encode())
        digest.update(str(stat.st_size).encode())
        with open(file, "rb") as f:
            head = f.read(8)
            digest.update(head)
            if len(head) == 8 and file.suffix == ".safetensors":
                digest.update(f.read(int.from_bytes(head, "little")))
    return {
        "ref": source.ref,
        "path": str(source.path),
        "files": [f.name for f in files],
        "bytes": source.total_bytes,
        "sha256_headers": digest.hexdigest(),
        "mtime": newest,
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("kruising", "torch", "safetensors", "transformers", "mergekit"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_provenance(
    folder: Path,
    recipe,
    sources: dict[str, ModelSource],
    plan: MergePlan | None,
    *,
    recipe_text: str,
    device: str,
    seconds: float,
    engine: str = "native",
    seed: int = 0,
    compute: dict[str, Any] | None = None,
    ties: dict[str, Any] | None = None,
) -> None:
    """Resolved parameters per tensor group, input fingerprints and package versions.

    ``compute``: the dtype the tensors were computed in (`engine.compute_record`; mergekit's
    engine: the recipe's); ``ties``: how many TIES entries the tie rule decided.
    """
    if compute is None:  # mergekit merged it: in the recipe's dtype
        compute = {"choice": "mergekit", "dtypes": [recipe.dtype] if recipe.dtype else []}
    groups: dict[str, list[dict[str, Any]]] = {}
    for task in plan.tasks if plan is not None else []:
        refs = [ref for ref, _ in task.inputs]
        entry = {
            "params": task.params,
            "per_model": {
                ref: values for ref, values in zip(refs, task.per_model, strict=True) if values
            },
        }
        bucket = groups.setdefault(task.group, [])
        for known in bucket:
            if known["params"] == entry["params"] and known["per_model"] == entry["per_model"]:
                known["tensors"].append(task.name)
                break
        else:
            bucket.append({"tensors": [task.name], **entry})
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "engine": engine,
        "merge_method": recipe.merge_method,
        "base_model": recipe.base_model,
        "recipe_sha256": hashlib.sha256(recipe_text.encode()).hexdigest(),
        "device": device,
        "seed": seed,
        "seconds": round(seconds, 3),
        "compute_dtype": compute,
        "tensors": len(plan.tasks) if plan is not None else None,
        "bytes_written": plan.write_bytes if plan is not None else None,
        "inputs": [input_fingerprint(s) for s in sources.values()],
        "groups": groups,
        **({"tie_rule": ties} if ties is not None else {}),
        "versions": _versions(),
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
