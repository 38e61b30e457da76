"""Recipe + opened inputs -> a list of tensor tasks with every parameter resolved.

Resolution follows mergekit exactly: a `models` recipe is one output slice over all layers of
every model (the base model is added when it is not listed); per-model settings win over the
slice's, which win over the recipe's global `parameters`; a gradient list is interpolated
over layer depth within its slice (layer i of n at t = i/(n-1), t = 1 for a 1-layer slice);
filters are substrings of the tensor name, first match wins; tensors outside the layers
(embeddings, final norm, lm_head) use t = 0 and the first (embeddings) or last (norm,
lm_head) slice's models. Every value is range-checked here, before any tensor is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kruising.console import console
from kruising.errors import KruisingError
from merger.core.arch import Architecture, Weight, architecture_of, check_layout, layers_held
from merger.core.io import ModelSource
from merger.core.methods import METHODS, MethodSpec
from merger.core.recipe import MergeRecipe, canonical_dtype, evaluate_setting

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class TensorTask:
    """One output tensor: its inputs, the method and the resolved parameters."""

    name: str
    inputs: list[tuple[str, str]]  # (model ref, tensor name in that model)
    base_index: int | None
    params: dict[str, Any]
    per_model: list[dict[str, Any]]
    shape: tuple[int, ...]
    in_dtype: torch.dtype | None  # recipe `dtype`: inputs are cast to it first (mergekit)
    out_dtype: torch.dtype
    group: str  # e.g. "slice 0, layer 3" or "embed": the unit provenance reports
    #: the dtype the method computes in: mergekit's (recipe `dtype`, else the promoted stored
    #: dtypes), or float32 with `build_plan(compute_dtype=torch.float32)` (float64 stays)
    compute_dtype: torch.dtype | None = None
    #: a vocabulary tensor under `tokenizer:`/`tokenizer_source`: the inputs re-indexed to
    #: the output tokenizer first (merger.core.tokenizer); None: merged as stored
    vocab: Any = None

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.out_dtype).element_size()


@dataclass
class SliceSource:
    model: str
    start: int
    end: int
    parameters: dict[str, Any] | None


@dataclass
class OutSlice:
    sources: list[SliceSource]
    base_model: str | None
    parameters: dict[str, Any] | None
    module_parameters: dict[str, Any] | None = None  # `modules.<name>.parameters`


@dataclass
class MergePlan:
    recipe: MergeRecipe
    method: MethodSpec
    tasks: list[TensorTask]
    sources: dict[str, ModelSource]
    base_model: str | None
    num_layers: int
    donor: str  # the model whose config, generation config and tokenizer the child starts from
    #: the output tokenizer when the recipe builds one (merger.core.tokenizer); None: copied
    tokenizer: Any = None
    #: mergekit's definition of the inputs' architecture (tensor names, layer-count key)
    architecture: Architecture | None = None
    #: the recipe gave slices: the child's config gets the new layer count (mergekit)
    sliced: bool = False
    #: each child layer's origin: (model ref, layer index) of its slice's first source
    layer_sources: list[tuple[str, int]] | None = None

    @property
    def read_bytes(self) -> int:
        needed = {pair for task in self.tasks for pair in task.inputs}
        return sum(self.sources[ref].tensors[name].nbytes for ref, name in needed)

    @property
    def write_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)


def parse_dtype(name: str | None, field: str) -> torch.dtype | None:
    """A recipe dtype name (``bfloat16``, ``torch.float16``, ...) as a torch dtype."""
    if name is None:
        return None
    canonical = canonical_dtype(name)
    if canonical is None:
        raise KruisingError(
            f"recipe {field}: unknown dtype {name!r}", f"use one of {', '.join(TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[canonical]


def method_for(recipe: MergeRecipe) -> MethodSpec:
    method = METHODS.get(recipe.merge_method)
    if method is None:
        raise KruisingError(
            f"merge_method {recipe.merge_method!r} has no native implementation",
            f"native methods: {', '.join(sorted(METHODS))}; for any other mergekit method "
            "run with --engine mergekit",
        )
    return method


#: mergekit's name of the one module of a decoder-only architecture (`modules: {default: ...}`)
DEFAULT_MODULE = "default"


def _out_slices(recipe: MergeRecipe, layers: dict[str, int]) -> list[OutSlice]:
    """The output slices, as mergekit normalises a recipe: `models` (top level or of the one
    module) becomes one slice over every layer of every model, the base model added when it
    is not listed; `modules: {default: ...}` is that module's models or slices."""
    models, slices, module_parameters = recipe.models, recipe.slices, None
    if recipe.modules:
        unknown = [name for name in recipe.modules if name != DEFAULT_MODULE]
        if unknown:
            raise KruisingError(
                f"modules.{unknown[0]}: a decoder-only model has one module, "
                f"{DEFAULT_MODULE!r} (mergekit's name for it)",
                f"write modules: {{{DEFAULT_MODULE}: {{models: ...}}}}, or use models:/slices:; "
                "a multi-module (e.g. vision + text) architecture runs with --engine mergekit",
            )
        module = recipe.modules[DEFAULT_MODULE]
        models, slices, module_parameters = module.models, module.slices, module.parameters
    if slices:
        out = []
        for i, s in enumerate(slices):
            if s.residual_weight is not None:
                console.print(
                    f"[yellow]note:[/] slices[{i}].residual_weight is read but not used by "
                    "mergekit 0.1.5, so it changes nothing here either"
                )
            out.append(
                OutSlice(
                    [
                        SliceSource(
                            src.model, src.layer_range[0], src.layer_range[1], src.parameters
                        )
                        for src in s.sources
                    ],
                    s.base_model,
                    s.parameters,
                    module_parameters,
                )
            )
        return out
    members = [SliceSource(m.model, 0, layers[m.model], m.parameters) for m in models]
    if recipe.base_model and recipe.base_model not in {m.model for m in models}:
        base = recipe.base_model
        members.append(SliceSource(base, 0, layers[base], None))
    return [OutSlice(members, None, None, module_parameters)]


def _count_problem(method: MethodSpec, n_inputs: int, n_non_base: int) -> str | None:
    """mergekit's input contract of a method, for one slice (None when it is met)."""
    for what, count, low, high in (
        ("models (base included)", n_inputs, method.min_models, method.max_models),
        ("models besides the base", n_non_base, method.min_non_base, method.max_non_base),
    ):
        if count < low or (high is not None and count > high):
            if low == high:
                need = f"exactly {low}"
            elif high is None:
                need = f"at least {low}"
            elif low <= 1 and count > high:
                need = f"at most {high}"
            else:
                need = f"{low} to {high}"
            return f"{method.name} merges {need} {what}, the recipe gives {count}"
    return None


def _resolve(
    method: MethodSpec,
    settings: Sequence[dict | None],
    spec_name: str,
    tensor_name: str,
    t: float,
    where: str,
    errors: dict[str, str],
) -> Any:
    spec = method.param(spec_name)
    for scope in settings:
        if scope and spec_name in scope:
            value = evaluate_setting(tensor_name, scope[spec_name], t)
            if value is None:
                continue
            try:
                return spec.check(value)
            except ValueError as exc:
                errors.setdefault(str(exc), f"{exc} (first at {where})")
                return spec.default
    if spec.required:
        model = where.split(": ")[0] if ": " in where else "the merge"
        errors.setdefault(
            f"missing {spec_name} {model}",
            f"missing required parameter {spec_name} for {where}",
        )
        return None
    return spec.default


def build_plan(
    recipe: MergeRecipe,
    sources: dict[str, ModelSource],
    compute_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Resolve the whole merge up front; raise one KruisingError listing every problem.

    ``compute_dtype``: None computes as mergekit (in the recipe's ``dtype``); float32 computes
    every tensor in at least float32 (``merge run --compute-dtype float32``); the stored
    dtypes stay mergekit's either way.
    """
    method = method_for(
        recipe
    )  # names and literal ranges: checked by MergeRecipe (merger.core.params)
    in_dtype = parse_dtype(recipe.dtype, "dtype")
    out_dtype = parse_dtype(recipe.out_dtype, "out_dtype")
    architecture = architecture_of(sources)
    layers = {
        ref: architecture.num_layers(ref, source.config, source.path)
        for ref, source in sources.items()
    }
    for ref, source in sources.items():
        _check_layer_count(architecture, ref, source, layers[ref])
        check_layout(architecture, ref, source.tensors, layers[ref])
    slices = _out_slices(recipe, layers)
    sliced = bool(recipe.slices or (recipe.modules and recipe.modules[DEFAULT_MODULE].slices))
    for i, s in enumerate(slices):
        n_inputs = len(s.sources)
        refs = [src.model for src in s.sources]
        twice = next((ref for ref in refs if refs.count(ref) > 1), None)
        if twice is not None:  # mergekit: "Duplicate merge inputs"
            where = "the recipe" if len(slices) == 1 else f"slices[{i}]"
            raise KruisingError(
                f"{where} lists {twice} twice as a merge input",
                "list each model once (mergekit refuses duplicates too)",
            )
        lengths = {src.end - src.start for src in s.sources}
        if len(lengths) != 1:
            raise KruisingError(
                f"slices[{i}]: sources cover different numbers of layers ({sorted(lengths)})",
                "every source of a slice needs a layer_range of the same length",
            )
        for src in s.sources:
            n_layers = layers[src.model]
            if not 0 <= src.start < src.end <= n_layers:
                raise KruisingError(
                    f"slices[{i}]: layer_range [{src.start}, {src.end}] is outside "
                    f"{src.model}'s {n_layers} layers",
                    f"use a range within [0, {n_layers}]",
                )
        base = s.base_model or recipe.base_model
        if method.needs_base and base is None:
            raise KruisingError(
                f"{method.name} needs a base_model", "add `base_model:` to the recipe"
            )
        in_slice = base is not None and base in {src.model for src in s.sources}
        if method.uses_base and base is not None and not in_slice:
            raise KruisingError(
                f"base_model {base} is not among the inputs of slices[{i}]",
                "list the base model among the slice's sources",
            )
        problem = _count_problem(method, n_inputs, n_inputs - int(in_slice and method.uses_base))
        if problem:
            raise KruisingError(
                problem if len(slices) == 1 else f"slices[{i}]: {problem}",
                "list the right number of models",
            )

    from merger.core.tokenizer import plan_tokenizer

    tokenizer = plan_tokenizer(recipe, sources)  # every tokenizer check, before any tensor
    errors: dict[str, str] = {}
    tasks: list[TensorTask] = []
    donor = recipe.base_model or next(iter(sources))
    # the child's layer count, as in mergekit's output config (${num_layers} in templates)
    out_layers = layers[donor]
    if sliced:
        out_layers = sum(s.sources[0].end - s.sources[0].start for s in slices)

    def add(
        out_name: str,
        in_names: list[str],
        s: OutSlice,
        t: float,
        group: str,
        vocabulary: bool = False,  # indexed by token ids (the definition's vocabulary_axis)
    ) -> None:
        refs = [src.model for src in s.sources]
        base = s.base_model or recipe.base_model
        base_index = refs.index(base) if base is not None and base in refs else None
        shapes, infos = [], []
        for ref, name in zip(refs, in_names, strict=True):
            info = sources[ref].tensors.get(name)
            if info is None:
                errors.setdefault(name, f"tensor {name} is missing in model {ref}")
                return
            shapes.append(info.shape)
            infos.append(info)
        kinds = [info.dtype.is_floating_point for info in infos]
        if len(set(kinds)) > 1:  # e.g. bf16 bytes relabelled I16: the values would be garbage
            odd = infos[kinds.index(not kinds[0])] if kinds[0] else infos[0]
            errors.setdefault(
                out_name,
                f"dtype mismatch in {odd.file}: tensor {in_names[infos.index(odd)]} is stored as "
                f"{str(odd.dtype).removeprefix('torch.')}, the other models store floats",
            )
            return
        vocab = None
        if tokenizer is not None and vocabulary:
            vocab, problem = tokenizer.vocab_task(out_name, refs, shapes, base)
            if problem:
                errors.setdefault(problem, problem)
                return
            shapes = [(vocab.rows, *shape[1:]) for shape in shapes]
        if len(set(shapes)) > 1:
            errors.setdefault(out_name, _shape_problem(out_name, refs, shapes))
            return
        global_settings = [s.parameters, s.module_parameters, recipe.parameters]
        where = f"{out_name} ({group})"
        params = {
            p.name: _resolve(method, global_settings, p.name, out_name, t, where, errors)
            for p in method.parameters
            if not p.per_model and not p.unused
        }
        per_model = []
        for i, (src, name) in enumerate(zip(s.sources, in_names, strict=True)):
            chain = [src.parameters, s.parameters, s.module_parameters, recipe.parameters]
            per_model.append(
                {
                    p.name: _resolve(
                        method, chain, p.name, name, t, f"{src.model}: {where}", errors
                    )
                    for p in method.parameters
                    if p.per_model and not p.unused and (i != base_index or p.applies_to_base)
                }
            )
        if method.check is not None:
            non_base = [
                row for i, row in enumerate(per_model) if i != base_index or not method.uses_base
            ]
            problem = method.check(params, non_base)
            if problem:
                errors.setdefault(problem, f"{problem} (first at {where})")
        compute = in_dtype  # mergekit: loaded in `dtype`, else the promoted stored dtype
        if compute is None:
            compute = sources[refs[0]].tensors[in_names[0]].dtype
            for ref, name in zip(refs[1:], in_names[1:], strict=True):
                compute = torch.promote_types(compute, sources[ref].tensors[name].dtype)
        dtype = out_dtype or method.result_dtype(compute)
        if compute_dtype is not None:
            compute = torch.promote_types(compute, compute_dtype)
        tasks.append(
            TensorTask(
                out_name,
                list(zip(refs, in_names, strict=True)),
                base_index,
                params,
                per_model,
                shapes[0],
                in_dtype,
                dtype,
                group,
                compute,
                vocab,
            )
        )

    def add_weight(out: Weight, ins: list[Weight], s: OutSlice, t: float, group: str) -> None:
        """mergekit's `plan_tensor`: each input's stored name (name, alias, tied name); an
        optional weight no input stores is skipped."""
        refs = [src.model for src in s.sources]
        if len(ins) < len(refs):  # mergekit zips the last slice's models with the first's
            errors.setdefault(
                out.name,
                f"the last slice has more sources than the first: mergekit merges {out.name} "
                f"over only its first {len(ins)}",
            )
            return
        ins = ins[: len(refs)]
        if out.optional and not any(
            w.present_in(sources[ref].tensors) for ref, w in zip(refs, ins, strict=False)
        ):
            return
        if out.force_dtype is not None:
            errors.setdefault(
                out.name, f"{out.name} has a forced dtype ({out.force_dtype}) in mergekit"
            )
            return
        names = []
        for ref, w in zip(refs, ins, strict=False):
            stored = w.stored_name(sources[ref].tensors)
            if stored is None and out.optional:  # mergekit merges it over the other models
                errors.setdefault(
                    out.name,
                    f"optional tensor {out.name} is missing in model {ref} but stored by "
                    "another input",
                )
                return
            names.append(stored or w.name)
        add(out.name, names, s, t, group, vocabulary=out.vocabulary_axis is not None)

    # mergekit's `plan_module`: pre weights over the first slice's models, each slice's
    # layers, post weights over the last slice's models
    for weight in architecture.pre_weights(out_layers):
        add_weight(weight, [weight] * len(slices[0].sources), slices[0], 0.0, "embeddings")
    out_layer = 0
    layer_sources = []
    for i, s in enumerate(slices):
        length = s.sources[0].end - s.sources[0].start
        for offset in range(length):
            layer_sources.append((s.sources[0].model, s.sources[0].start + offset))
            t = offset / (length - 1) if length > 1 else 1.0
            outs = architecture.layer_weights(out_layer, out_layers)
            ins = [
                architecture.layer_weights(src.start + offset, layers[src.model])
                for src in s.sources
            ]
            for j, weight in enumerate(outs):
                add_weight(weight, [w[j] for w in ins], s, t, f"slice {i}, layer {out_layer}")
            out_layer += 1
    if sliced and isinstance(sources[donor].config.get("layer_types"), list):
        for ref, index in layer_sources:  # the child's layer_types, one per layer
            types = sources[ref].config.get("layer_types")
            if not isinstance(types, list) or index >= len(types):
                errors.setdefault(
                    f"layer_types {ref}",
                    f"config.json of {ref}: layer_types has no entry for layer {index}",
                )
    for weight in architecture.post_weights(out_layers):
        add_weight(weight, [weight] * len(slices[0].sources), slices[-1], 0.0, "head")

    if errors:
        problems = list(errors.values())
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise KruisingError("; ".join(shown), _hint_for(problems[0]))
    return MergePlan(
        recipe,
        method,
        tasks,
        sources,
        recipe.base_model,
        out_layer,
        donor,
        tokenizer,
        architecture=architecture,
        sliced=sliced,
        layer_sources=layer_sources,
    )


def _check_layer_count(arch: Architecture, ref: str, source: ModelSource, claimed: int) -> None:
    """The config's layer count against the layers the shards hold: a config that claims
    more (damaged, or a billion to make the plan loop for hours) is refused."""
    if arch.override_num_layers is not None:
        return
    held = layers_held(arch, source.tensors)
    if claimed > held:
        raise KruisingError(
            f"{source.path / 'config.json'}: {arch.num_layers_key or 'num_hidden_layers'} is "
            f"{claimed}, but the shards of {ref} hold {held} layers",
            "a damaged or mismatched config.json; re-download or re-save this checkpoint",
        )


def _shape_problem(name: str, refs: list[str], shapes: list[tuple[int, ...]]) -> str:
    first = shapes[0]
    other = next(i for i, s in enumerate(shapes) if s != first)
    if "embed" in name or "lm_head" in name:
        return (
            f"vocabulary sizes differ in {name}: {refs[0]} has {first[0]} rows, "
            f"{refs[other]} has {shapes[other][0]}"
        )
    return (
        f"shape mismatch in {name}: {refs[0]} has {tuple(first)}, "
        f"{refs[other]} has {tuple(shapes[other])}"
    )


def _hint_for(problem: str) -> str:
    if problem.startswith("vocabulary sizes differ"):
        return (
            "the models use different tokenizers: set `tokenizer_source: union` (every "
            "model's tokens) or `tokenizer_source: base` (the base model's), as in mergekit"
        )
    if problem.startswith("shape mismatch"):
        return "the models are not the same architecture/size; merge only same-shaped models"
    if "sum to 0" in problem:
        return "give the models weights that do not cancel out, or set normalize: false"
    if problem.startswith("dtype mismatch"):
        return "a damaged or relabelled shard: re-download or re-save that checkpoint"
    if "missing in model" in problem:
        return "the models do not share an architecture; check the model list"
    if "must be" in problem:
        return "fix the value in the recipe's parameters"
    return "fix the recipe's parameters"
