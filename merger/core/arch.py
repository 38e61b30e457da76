"""mergekit's architecture definitions, read as data: which tensors a model has and in what order.

mergekit 0.1.5 ships one JSON file per architecture (`mergekit/_data/architectures/*.json`):
the weights before the first layer (embeddings), a template of one layer's weights
(`${layer_index}` substituted), the weights after the last layer (final norm, lm_head), and
the config key that holds the number of layers. mergekit picks the definition by the
config's single `architectures` entry, and by `model_type` when several definitions claim
that name. We read the same files (with json, without importing mergekit) and make the same
choice, so every architecture mergekit defines merges natively with mergekit's tensor list.

Natively refused, each with one line naming what did not fit: a config whose architecture has
no definition (mergekit would guess one from the tensor names), definitions with several
modules (vision-language, encoder-decoder) or built in Python (AFMoE, GLM-4 MoE), inputs of
different architectures (mergekit's --allow-crimes), and a checkpoint holding a tensor that no
weight of its definition names.
"""

from __future__ import annotations

import importlib.util
import json
import re
import string
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from kruising.errors import KruisingError

#: built by mergekit in Python (mergekit/architecture/moe_defs.py), not from its JSON files
PYTHON_DEFINED = ("AfmoeForCausalLM", "Glm4MoeForCausalLM")
#: buffers some checkpoints store (causal masks, rotary frequencies) that transformers ignores
#: on load; mergekit leaves them out of the child, and so do we
IGNORED_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
ENGINE_HINT = "run with --engine mergekit"


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"  # mergekit's: ${layer_index+1}


def _substitute(text: str, num_layers: int, layer_index: int | None) -> str:
    if "{" not in text:
        return text
    values: dict[str, int] = {
        "num_layers": num_layers,
        "num_layers+1": num_layers + 1,
        "num_layers-1": num_layers - 1,
    }
    if layer_index is not None:
        values |= {
            "layer_index": layer_index,
            "layer_index+1": layer_index + 1,
            "layer_index-1": layer_index - 1,
        }
    return _Template(text).substitute(values)


@dataclass(frozen=True)
class Weight:
    """One tensor of a definition (mergekit's WeightInfo)."""

    name: str
    optional: bool = False
    aliases: tuple[str, ...] = ()
    tied_names: tuple[str, ...] = ()
    vocabulary_axis: int | None = None
    force_dtype: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Weight:
        return cls(
            data["name"],
            bool(data.get("optional", False)),
            tuple(data.get("aliases") or ()),
            tuple(data.get("tied_names") or ()),
            data.get("vocabulary_axis"),
            data.get("force_dtype"),
        )

    def at(self, num_layers: int, layer_index: int | None = None) -> Weight:
        def sub(text: str) -> str:
            return _substitute(text, num_layers, layer_index)

        return replace(
            self,
            name=sub(self.name),
            aliases=tuple(sub(a) for a in self.aliases),
            tied_names=tuple(sub(a) for a in self.tied_names),
        )

    def stored_name(self, tensors: Any) -> str | None:
        """The name this weight has in a checkpoint (`tensors`: its names), as mergekit's
        loader looks it up: the name, then each alias, then each tied name."""
        for name in (self.name, *self.aliases, *self.tied_names):
            if name in tensors:
                return name
        return None

    def present_in(self, tensors: Any) -> bool:
        """mergekit's test for skipping an optional weight: the name or an alias (not a
        tied name) is stored."""
        return any(name in tensors for name in (self.name, *self.aliases))


@dataclass(frozen=True)
class Architecture:
    """One of mergekit's JSON definitions (a single-module one, or the names of a modular one)."""

    file: str
    model_type: str
    names: tuple[str, ...]
    pre: tuple[Weight, ...] = ()
    layer: tuple[Weight, ...] = ()
    post: tuple[Weight, ...] = ()
    num_layers_key: str | None = None
    override_num_layers: int | None = None
    modules: tuple[str, ...] = ("default",)

    @classmethod
    def from_json(cls, file: str, data: dict[str, Any]) -> Architecture:
        if data.get("kind", "module") == "modular":
            return cls(
                file,
                data["model_type"],
                tuple(data["architectures"]),
                modules=tuple(data["modules"]),
            )
        return cls(
            file,
            data["model_type"],
            tuple(data["architectures"]),
            tuple(Weight.from_json(w) for w in data["pre_weights"]),
            tuple(Weight.from_json(w) for w in data["layer_templates"]["weights"]),
            tuple(Weight.from_json(w) for w in data["post_weights"]),
            data.get("num_layers_config_key"),
            data.get("override_num_layers"),
        )

    def num_layers(self, ref: str, config: dict[str, Any], path: Path | None = None) -> int:
        """The model's layer count, from the definition's config key (dotted keys descend)."""
        if self.override_num_layers is not None:
            return self.override_num_layers
        key = self.num_layers_key or "num_hidden_layers"
        value = config_value(config, key, path)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise KruisingError(
                f"config.json of {ref}: {key} (the layer count of mergekit's {self.file} "
                f"definition) is {value!r}",
                f"set {key} to the number of layers the checkpoint holds",
            )
        return value

    def pre_weights(self, num_layers: int) -> list[Weight]:
        return [w.at(num_layers) for w in self.pre]

    def layer_weights(self, index: int, num_layers: int) -> list[Weight]:
        return [w.at(num_layers, index) for w in self.layer]

    def post_weights(self, num_layers: int) -> list[Weight]:
        return [w.at(num_layers) for w in self.post]

    def all_names(self, num_layers: int) -> set[str]:
        """Every name and alias a checkpoint of this definition may store."""
        weights = self.pre_weights(num_layers) + self.post_weights(num_layers)
        for i in range(num_layers):
            weights += self.layer_weights(i, num_layers)
        return {name for w in weights for name in (w.name, *w.aliases)}


_MISSING = object()


def config_value(config: dict[str, Any], key: str, path: Path | None = None) -> Any:
    """`config[key]` with dotted keys descending into sub-configs; a key the file leaves to
    its transformers config class (a default, or an `attribute_map` alias) is read from that
    class, as mergekit reads it from the loaded PretrainedConfig."""
    value: Any = config
    for part in key.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            break
    if value is not _MISSING:
        return value
    if path is not None and (path / "config.json").is_file():
        try:
            from transformers import AutoConfig

            loaded: Any = AutoConfig.from_pretrained(str(path))
            for part in key.split("."):
                loaded = getattr(loaded, part)
            return loaded
        except Exception:  # no such class or attribute: reported as missing below
            pass
    return None


def definitions_folder() -> Path:
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        raise KruisingError(
            "mergekit is not installed: its architecture definitions tell the native engine "
            "each model's tensors",
            "pip install mergekit==0.1.5 (a dependency of kruising)",
        )
    return Path(spec.submodule_search_locations[0]) / "_data" / "architectures"


@lru_cache(maxsize=1)
def definitions() -> dict[str, tuple[Architecture, ...]]:
    """mergekit's definitions by architecture name, in mergekit's order (its directory order)."""
    by_name: dict[str, list[Architecture]] = {}
    for file in definitions_folder().iterdir():
        if file.is_file() and file.name.lower().endswith(".json"):
            arch = Architecture.from_json(file.name, json.loads(file.read_text()))
            for name in arch.names:
                by_name.setdefault(name, []).append(arch)
    return {name: tuple(archs) for name, archs in by_name.items()}


def architecture_for(ref: str, config: dict[str, Any]) -> Architecture:
    """mergekit's `arch_info_for_config`: the one `architectures` entry picks the definition;
    when several definitions claim it, the one whose model_type is the config's."""
    names = config.get("architectures")
    if not isinstance(names, list) or len(names) != 1:
        raise KruisingError(
            f"config.json of {ref}: `architectures` is {names!r}; mergekit needs exactly one "
            "architecture name to find the model's layout",
            'set e.g. "architectures": ["MistralForCausalLM"] in its config.json',
        )
    name = names[0]
    if name in PYTHON_DEFINED:
        raise KruisingError(
            f"{ref} is a {name}, whose layout mergekit builds in Python; the native "
            "engine reads only mergekit's JSON definitions",
            ENGINE_HINT,
        )
    candidates = definitions().get(name, ())
    arch = candidates[0] if len(candidates) == 1 else None
    if len(candidates) > 1:
        model_type = config.get("model_type")
        arch = next((c for c in candidates if c.model_type == model_type), None)
    if arch is None:
        known = ", ".join(c.model_type for c in candidates)
        why = f"(model_type {config.get('model_type')!r} is none of {known})" if known else ""
        raise KruisingError(
            f"{ref}: mergekit 0.1.5 has no architecture definition for {name} {why}".rstrip(),
            f"{ENGINE_HINT} (mergekit then guesses the layout from the tensor names)",
        )
    if arch.modules != ("default",):
        raise KruisingError(
            f"{ref} is a {name}, which mergekit defines as several modules "
            f"({', '.join(arch.modules)}); the native engine merges single-module models",
            ENGINE_HINT,
        )
    return arch


def architecture_of(sources: dict[str, Any], allow_crimes: bool = False) -> Architecture:
    """The one definition every input follows (mergekit: the first model's; others must
    be the same unless --allow-crimes)."""
    refs = list(sources)
    archs = {ref: architecture_for(ref, sources[ref].config) for ref in refs}
    first = archs[refs[0]]
    other = next((ref for ref in refs if archs[ref] != first), None)
    if other is not None:
        raise KruisingError(
            f"{refs[0]} is a {first.names[0]} ({first.file}) but {other} is a "
            f"{archs[other].names[0]} ({archs[other].file}): mergekit refuses to mix "
            "architectures without --allow-crimes",
            "merge models of one architecture, or run with --engine mergekit --allow-crimes",
        )
    return first


def check_layout(arch: Architecture, ref: str, tensors: Any, num_layers: int) -> list[str]:
    """Refuse a checkpoint holding a tensor the definition does not name (its layout is
    not the definition's: merging it by the definition would drop or misplace that tensor).
    Returns the stored buffers that are left out (causal masks, rotary frequencies)."""
    known = arch.all_names(num_layers)
    dropped = []
    for name in tensors:
        if name in known:
            continue
        if IGNORED_BUFFERS.search(name):
            dropped.append(name)
            continue
        raise KruisingError(
            f"tensor {name} of {ref} fits no weight of mergekit's {arch.file} definition "
            f"({arch.names[0]}, {num_layers} layers by "
            f"{arch.num_layers_key or 'num_hidden_layers'})",
            "check that config.json's layer count and architecture match the weights; "
            f"{ENGINE_HINT} to merge by mergekit's rules (it leaves such tensors out)",
        )
    return dropped


def layers_held(arch: Architecture, tensors: Any) -> int:
    """How many layers the stored tensors hold (the highest layer index + 1), read with the
    definition's layer templates (names and aliases, `${layer_index}` as a number)."""
    patterns = []
    for weight in arch.layer:
        for name in (weight.name, *weight.aliases):
            if "${layer_index}" not in name:
                continue
            parts = [re.escape(_substitute(p, 0, 0)) for p in name.split("${layer_index}")]
            patterns.append("(\\d+)".join(parts))
    if not patterns:
        return 0
    matcher = re.compile("|".join(f"(?:{p})" for p in patterns))
    held = 0
    for name in tensors:
        match = matcher.fullmatch(name)
        if match:
            held = max(held, max(int(g) for g in match.groups() if g is not None) + 1)
    return held
