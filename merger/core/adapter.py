"""``model+lora`` inputs: a PEFT LoRA adapter applied to its model first, as mergekit does.

mergekit (``ModelReference.merged``) loads the model in its stored dtype, loads the adapter
with PEFT (whose weights it casts to float32) and calls ``merge_and_unload``: for every
adapted linear layer ``W <- W + (B @ A) * scaling``, computed in float32 and rounded once to
W's dtype (``scaling`` is ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA, per module with
``rank_pattern``/``alpha_pattern``); an embedding adds ``(B @ A).T * scaling``, rounded to
W's dtype first (peft's ``Embedding.merge``). Then it merges the saved result.

Here the same sum is formed as each adapted tensor is read (`LoraSource`), so nothing is
written first; with ``--lora-merge-cache DIR`` the merged model is kept in DIR under
mergekit's folder name (``<model>_<crc>_<adapter>_<crc>``) and reused by later runs (also a
copy mergekit made there). The child's config and tokenizer are the model's, as mergekit's.
``--lora-merge-dtype D`` (mergekit's ``lora_merge_dtype``: ``from_pretrained(torch_dtype=D)``)
casts every floating tensor of the model to D before the adapter is added, so the merged
model is D throughout; a cached copy in another dtype is refused (mergekit would reuse it).
Adapters with parts that are more than A and B (DoRA, LoRA biases, ``modules_to_save``,
trainable tokens) are refused with a hint.
"""

from __future__ import annotations

import binascii
import json
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from kruising.atomic import replace_folder, temp_sibling
from kruising.console import console
from kruising.errors import KruisingError
from kruising.hub import resolve_model
from merger.core.io import (
    ModelSource,
    ShardWriter,
    TensorInfo,
    open_model,
    parse_size,
    read_safetensors_header,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_HINT = "merge the adapter with --engine mergekit, or merge_and_unload() it with peft first"
#: adapter_config keys that change what the adapter computes beyond W + s * B @ A
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA biases",
    "modules_to_save": "modules_to_save (full weights)",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
}


def split_lora_ref(ref: str) -> tuple[str, str | None]:
    """``"org/model+org/adapter"`` -> ``("org/model", "org/adapter")``; no ``+`` -> ``(ref, None)``."""
    parts = ref.split("+")
    if len(parts) == 1:
        return ref, None
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise KruisingError(
            f"cannot read model reference {ref!r}", "write MODEL+ADAPTER (one +, like mergekit)"
        )
    return parts[0], parts[1]


def _unique_id(ref: str) -> str:
    """mergekit's ``ModelPath._unique_id``: folder name and crc32 of ``path[@revision]``."""
    path = ref.partition("@")[0]
    return Path(path).name + "_" + str(binascii.crc32(ref.encode()))


@dataclass(frozen=True)
class LoraLayer:
    a: str | None  # tensor names in the adapter file
    b: str | None
    scaling: float
    transpose: bool  # fan_in_fan_out (Conv1D layers) or an embedding
    #: the layer's own weight saved with the adapter (peft's save_embedding_layers): it is
    #: loaded over the model's before the sum, as PeftModel.from_pretrained does
    base: str | None = None
    #: peft's Embedding.merge rounds the delta to W's dtype before adding (Linear does not)
    embedding: bool = False


@dataclass
class LoraSource(ModelSource):
    """A model with a LoRA adapter: tensors read from the model, adapted ones summed on read."""

    inner: ModelSource | None = None
    adapter: ModelSource | None = None
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    #: --lora-merge-dtype: the model's floating tensors cast to it first (mergekit loads it so)
    dtype: torch.dtype | None = None

    def read(self, name: str) -> torch.Tensor:
        weight = self.inner.read(name)
        if self.dtype is not None and weight.is_floating_point():
            weight = weight.to(self.dtype)
        layer = self.layers.get(name)
        if layer is None:
            return weight
        if layer.base is not None:
            weight = self.adapter.read(layer.base).to(weight.dtype)
        if layer.a is None:
            return weight
        a = self.adapter.read(layer.a).float()
        b = self.adapter.read(layer.b).float()
        delta = b @ a
        if layer.transpose:
            delta = delta.T
        delta = delta * layer.scaling
        if layer.embedding:
            return weight + delta.to(weight.dtype)
        return (weight.float() + delta).to(weight.dtype)

    def prefetch(self, name: str) -> None:
        self.inner.prefetch(name)

    def release(self, name: str) -> None:
        self.inner.release(name)

    def close(self) -> None:
        self.inner.close()
        self.adapter.close()


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the module name's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _adapter_layers(
    ref: str, config: dict[str, Any], header: dict[str, TensorInfo], model: ModelSource
) -> dict[str, LoraLayer]:
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise KruisingError(f"adapter {ref} uses {what}, which is more than W + B @ A", _HINT)
    if config.get("peft_type", "LORA") != "LORA":
        raise KruisingError(f"adapter {ref} is {config.get('peft_type')}, not LoRA", _HINT)
    alpha, r = config.get("lora_alpha", 8), config.get("r", 8)
    layers: dict[str, LoraLayer] = {}
    modules: dict[str, dict[str, str]] = {}
    for key in header:
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
            r"base_layer)(?:\.weight)?",
            key,
        )
        if match is None:
            raise KruisingError(f"adapter {ref}: tensor {key} is not a LoRA A or B matrix", _HINT)
        part = {"base_layer": "base"}.get(match[2], match[2].rsplit("_", 1)[-1])
        modules.setdefault(match[1], {})[part] = key
        if "embedding" in match[2]:
            modules[match[1]]["embedding"] = "yes"
    for module, parts in modules.items():
        target = f"{module}.weight"
        if target not in model.tensors:
            raise KruisingError(
                f"adapter {ref} adapts {target}, which model {model.ref} does not have",
                "use the adapter with the model it was trained on",
            )
        expected = model.tensors[target].shape
        base = parts.get("base")
        if base is not None and header[base].shape != expected:
            raise KruisingError(
                f"adapter {ref}: its saved {target} is {header[base].shape}, the model's is "
                f"{expected}",
                "use the adapter with the model it was trained on",
            )
        if "A" not in parts and "B" not in parts:
            layers[target] = LoraLayer(None, None, 0.0, False, base)
            continue
        if "A" not in parts or "B" not in parts:
            raise KruisingError(f"adapter {ref}: {module} has only one of lora_A, lora_B", _HINT)
        rank = _pattern_value(config.get("rank_pattern") or {}, module, r)
        scale = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scaling = scale / math.sqrt(rank) if config.get("use_rslora") else scale / rank
        a_shape, b_shape = header[parts["A"]].shape, header[parts["B"]].shape
        shape = (b_shape[0], a_shape[1])
        transpose = "embedding" in parts or bool(config.get("fan_in_fan_out"))
        if transpose:
            shape = shape[::-1]
        if shape != expected or a_shape[0] != b_shape[1]:
            raise KruisingError(
                f"adapter {ref}: B @ A of {module} is {shape}, {target} is {expected}",
                "use the adapter with the model it was trained on",
            )
        embedding = "embedding" in parts
        layers[target] = LoraLayer(parts["A"], parts["B"], scaling, transpose, base, embedding)
    return layers


def open_adapter(ref: str) -> tuple[Path, dict[str, Any], dict[str, TensorInfo]]:
    path = resolve_model(ref, allow_patterns=[ADAPTER_WEIGHTS, ADAPTER_CONFIG])
    if path is None:
        raise KruisingError(
            f"adapter folder not found: {ref}",
            "a LoRA adapter is a folder (or Hub id) with adapter_config.json and "
            "adapter_model.safetensors, as peft's save_pretrained writes",
        )
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise KruisingError(
            f"adapter {ref} has no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} in {path}",
            "convert adapter_model.bin to safetensors (peft save_pretrained)"
            if pickled
            else "save the adapter with peft's save_pretrained",
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise KruisingError(f"{config_file}: invalid JSON ({exc})", "fix or re-save it") from None
    return path, config, read_safetensors_header(weights)


def open_lora_input(
    ref: str,
    *,
    allow_pickle: bool = False,
    cache: Path | None = None,
    dtype: str | None = None,
) -> ModelSource:
    """Open ``model+adapter``: streamed (`LoraSource`), or the merged copy in ``cache``;
    ``dtype`` is mergekit's ``lora_merge_dtype`` (None: the model's stored dtypes)."""
    model_ref, adapter_ref = split_lora_ref(ref)
    model = open_model(model_ref, allow_pickle=allow_pickle)
    adapter_path, config, header = open_adapter(adapter_ref)
    layers = _adapter_layers(adapter_ref, config, header, model)
    adapter = ModelSource(adapter_ref, adapter_path, config, header)
    cast = getattr(torch, dtype.removeprefix("torch.")) if dtype else None
    tensors = dict(model.tensors)
    if cast is not None:
        tensors = {
            name: replace(info, dtype=cast) if info.dtype.is_floating_point else info
            for name, info in tensors.items()
        }
    source = LoraSource(
        ref,
        model.path,
        model.config,
        tensors,
        inner=model,
        adapter=adapter,
        layers=layers,
        dtype=cast,
    )
    if cache is None:
        return source
    folder = Path(cache).expanduser() / f"{_unique_id(model_ref)}_{_unique_id(adapter_ref)}"
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        _write_merged(source, folder)
    else:
        console.print(f"LoRA {ref}: reusing the merged copy in {folder}")
    source.close()
    merged = open_model(str(folder))
    stored = {info.dtype for info in merged.tensors.values() if info.dtype.is_floating_point}
    if cast is not None and stored != {cast}:
        merged.close()
        raise KruisingError(
            f"the merged copy of {ref} in {folder} is {'/'.join(sorted(map(str, stored)))}, "
            f"not --lora-merge-dtype {dtype}",
            "delete that folder (it is rebuilt on the next run), or use another --lora-merge-cache",
        )
    missing = sorted(set(model.tensors) - set(merged.tensors))
    if missing:
        raise KruisingError(
            f"the merged copy of {ref} in {folder} lacks {missing[0]}",
            "delete that folder; it is rebuilt on the next run",
        )
    return ModelSource(ref, model.path, model.config, merged.tensors)


def _write_merged(source: LoraSource, folder: Path) -> None:
    console.print(f"LoRA {source.ref}: writing the merged model to {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder, "kruising-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        layout = [(name, info.dtype, info.shape) for name, info in source.tensors.items()]
        writer = ShardWriter(tmp, layout, parse_size("5GB"))
        try:
            for name in source.tensors:
                writer.write(name, source.read(name))
                source.release(name)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(source.config, indent=2) + "\n")
        replace_folder(tmp, folder, old_tag="kruising-old")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
