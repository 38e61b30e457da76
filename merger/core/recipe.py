"""Merge recipes: mergekit's YAML schema, parsed strictly, every problem named by file and line.

A recipe is the YAML that ``mergekit-yaml`` takes: ``merge_method``, ``base_model``, one of
``models`` / ``slices`` / ``modules``, ``parameters`` (scalar, gradient list, ``{filter, value}``
or a list of those), ``dtype``, ``out_dtype``, ``tokenizer_source`` or ``tokenizer``,
``chat_template``. The field names and meanings are mergekit 0.1.5's; unlike mergekit, a key we
do not know is an error (mergekit silently drops it), and all problems of a file are reported
together, each as ``recipe.yaml:7: models[1].parameters.densty: unknown key``.

The parameters each method takes, their types and ranges come from the registry
(`merger.core.params`); a name the method does not declare, or a literal value out of its
range, is reported here with its line. Resolving a setting for one tensor is
:func:`evaluate_setting` (filters are substrings of the tensor name, the first matching entry
wins, gradients are interpolated over layer depth); the planner (`merger.core.plan`) walks the
scopes, most specific first.

Light module: pydantic and yaml only, no torch.
"""

from __future__ import annotations

import difflib
import functools
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kruising.config import (
    INVALID_YAML,
    SEVERAL_DOCUMENTS,
    Loc,
    Problem,
    Strict,
    compose_yaml,
    format_loc,
    line_of,
)
from kruising.errors import KruisingError
from merger.core.params import ParamSpec, declared

__all__ = [
    "ConditionalParameter",
    "InputModel",
    "InputSlice",
    "MergeRecipe",
    "ModelTokenEmbedding",
    "OutputModule",
    "OutputSlice",
    "ParameterSetting",
    "RecipeError",
    "RecipeProblem",
    "TokenEmbeddingConfig",
    "TokenizerConfig",
    "ZeroEmbedding",
    "canonical_dtype",
    "evaluate_setting",
    "load_recipe",
    "parse_model_ref",
    "parse_recipe",
    "recipe_to_yaml",
    "validate_recipe",
]

# --------------------------------------------------------------------------------------------
# Vocabulary: dtypes and the keys people mistype (parameters: merger.core.params)
# --------------------------------------------------------------------------------------------

#: dtype names mergekit's ``dtype_from_name`` understands (each also with a ``torch.`` prefix).
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_MISTAKES = {
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "double": "float64",
}

# Keys people write for a schema key (mergekit's early `pattern:` is today's `filter:`).
_KEY_ALIASES = {
    "pattern": "filter",
    "filters": "filter",
    "match": "filter",
    "layers": "layer_range",
    "range": "layer_range",
    "layer_ranges": "layer_range",
    "source": "sources",
    "model_name": "model",
    "path": "model",
    "params": "parameters",
    "parameter": "parameters",
    "method": "merge_method",
    "base": "base_model",
    "torch_dtype": "dtype",
    "template": "chat_template",
}

_SCHEMA_HINT = (
    "a recipe is mergekit's YAML: merge_method, base_model, models | slices | modules, "
    "parameters, dtype, out_dtype, tokenizer_source | tokenizer, chat_template"
)

# --------------------------------------------------------------------------------------------
# Field validators (each raises one PydanticCustomError with a message and a hint)
# --------------------------------------------------------------------------------------------


def _fail(kind: str, message: str, hint: str = "") -> PydanticCustomError:
    # Passed through the context so that braces in the message stay literal.
    return PydanticCustomError(kind, "{message}", {"message": message, "hint": hint})


def _check_model_ref(value: Any) -> str:
    """A model reference as mergekit's ``ModelReference`` takes it: ``path[@rev]``,
    ``model+lora`` (a PEFT adapter applied first) or ``{model: ..., lora: ...}`` (kept as the
    string ``model+lora``)."""
    if isinstance(value, Mapping) and "model" in value:
        value = _lora_dict_ref(value)
    if isinstance(value, str) and value.count("+") == 1:
        model, _, lora = value.partition("+")
        _check_plain_ref(model)
        _check_plain_ref(lora)
        return value
    if isinstance(value, str) and value.count("+") > 1:
        raise _fail(
            "model_ref",
            f"a model reference has at most one +adapter, got {value!r}",
            "write MODEL+ADAPTER, e.g. org/model+org/lora (mergekit's syntax)",
        )
    return _check_plain_ref(value)


def _lora_dict_ref(value: Mapping[str, Any]) -> Any:
    def path(part: Any) -> Any:
        if isinstance(part, Mapping) and set(part) <= {"path", "revision"} and "path" in part:
            return part["path"] + (f"@{part['revision']}" if part.get("revision") else "")
        return part

    extra = set(value) - {"model", "lora", "override_architecture"}
    if extra or value.get("override_architecture") is not None:
        raise _fail(
            "model_ref",
            "a model reference mapping has model and lora"
            + (f", not {sorted(extra)[0]}" if extra else "; override_architecture is not native"),
            "write {model: org/name, lora: org/adapter}; for override_architecture use "
            "--engine mergekit",
        )
    model, lora = path(value["model"]), path(value.get("lora"))
    if not isinstance(model, str) or (lora is not None and not isinstance(lora, str)):
        return value  # _check_plain_ref names it
    return model if lora is None else f"{model}+{lora}"


def _check_plain_ref(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(
            "model_ref",
            f"a model reference is a local folder or a Hub id, got {value!r}",
            "write the model as a string: ./path/to/model or org/name or org/name@revision",
        )
    if "+" in value:
        raise _fail(
            "model_ref",
            f"LoRA references (model+lora) are not supported here: {value!r}",
            "merge the adapter into its model first (peft: PeftModel.from_pretrained(model, "
            "lora).merge_and_unload().save_pretrained(folder)) and reference that folder",
        )
    if value.count("@") > 1:
        raise _fail(
            "model_ref",
            f"a model reference has at most one @revision, got {value!r}",
            "write org/name@revision",
        )
    path, _, revision = value.partition("@")
    if not path or ("@" in value and not revision):
        raise _fail(
            "model_ref",
            f"incomplete model reference {value!r}",
            "write org/name or org/name@revision (a branch, tag or commit)",
        )
    return value


def _check_dtype(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str) and canonical_dtype(value) is not None:
        return value
    suggestion = None
    if isinstance(value, str):
        bare = value.lower().removeprefix("torch.")
        suggestion = _DTYPE_MISTAKES.get(bare) or next(
            iter(difflib.get_close_matches(bare, DTYPES, n=1)), None
        )
    hint = f"did you mean {suggestion!r}? " if suggestion else ""
    raise _fail(
        "dtype",
        f"unknown dtype {value!r}",
        hint + "use one of " + ", ".join(DTYPES),
    )


def _check_tokenizer_source(value: Any) -> Any:
    if value is None or value in ("base", "union"):
        return value
    if not isinstance(value, str):
        raise _fail(
            "tokenizer_source",
            f"tokenizer_source is 'base', 'union' or a model reference, got {value!r}",
            "write tokenizer_source: base (or union, or org/name of the model whose tokenizer to use)",
        )
    if value.startswith("model:"):  # the syntax of mergekit's early README
        raise _fail(
            "tokenizer_source",
            f"the 'model:' prefix is not part of a model reference: {value!r}",
            f"write tokenizer_source: {value.removeprefix('model:')}",
        )
    return _check_model_ref(value)


def _check_layer_range(value: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(_is_number(v) and float(v).is_integer() for v in value)
    )
    if ok and 0 <= value[0] < value[1]:
        return (int(value[0]), int(value[1]))
    raise _fail(
        "layer_range",
        f"layer_range must be [start, end] with 0 <= start < end, got {value!r}",
        "layer_range is half-open like a Python slice: [0, 32] takes layers 0..31",
    )


def _check_positive_int(value: Any) -> Any:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise _fail("positive_int", f"must be a positive integer, got {value!r}", "e.g. 64")


ModelRef = Annotated[str, BeforeValidator(_check_model_ref)]
DType = Annotated[str | None, BeforeValidator(_check_dtype)]
TokenizerSource = Annotated[
    Literal["base", "union"] | str | None, BeforeValidator(_check_tokenizer_source)
]
LayerRange = Annotated[tuple[int, int], BeforeValidator(_check_layer_range)]

# --------------------------------------------------------------------------------------------
# Parameter settings: scalar | gradient | {filter, value} | [{filter, value}, ...]
# --------------------------------------------------------------------------------------------

Scalar = bool | int | float | str
_SCALAR_TYPES = (bool, int, float, str)


def _value_kind(value: Any) -> str | None:
    if isinstance(value, _SCALAR_TYPES):
        return "~scalar"
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALAR_TYPES) for v in value):
        return "~gradient"
    return None


ScalarOrGradient = Annotated[
    Annotated[Scalar, Tag("~scalar")] | Annotated[list[Scalar], Tag("~gradient")],
    Discriminator(
        _value_kind,
        custom_error_type="invalid_value",
        custom_error_message="a value is a number, true/false, a string or a list of those (a gradient)",
    ),
]


class ConditionalParameter(Strict):
    """``{filter, value}``: applies ``value`` to tensors whose name contains ``filter``."""

    filter: str | None = None
    value: ScalarOrGradient


def _setting_kind(value: Any) -> str | None:
    if isinstance(value, (dict, ConditionalParameter)):
        return "~conditional"
    kind = _value_kind(value)
    if kind is not None:
        return kind
    if isinstance(value, (list, tuple)) and all(
        isinstance(v, (dict, ConditionalParameter)) for v in value
    ):
        return "~conditionals"
    return None


ParameterSetting = Annotated[
    Annotated[Scalar, Tag("~scalar")]
    | Annotated[list[Scalar], Tag("~gradient")]
    | Annotated[ConditionalParameter, Tag("~conditional")]
    | Annotated[list[ConditionalParameter], Tag("~conditionals")],
    Discriminator(
        _setting_kind,
        custom_error_type="invalid_setting",
        custom_error_message=(
            "a parameter is a number, true/false, a string, a list of numbers (a gradient), "
            "or {filter, value} entries; not a mix"
        ),
    ),
]
Parameters = dict[str, ParameterSetting]

# --------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------


class InputModel(Strict):
    """``models[i]``: a whole model, with parameters for tensors coming from it."""

    model: ModelRef
    parameters: Parameters | None = None


class InputSlice(Strict):
    """``slices[i].sources[j]``: layers ``[start, end)`` of one model."""

    model: ModelRef
    layer_range: LayerRange
    parameters: Parameters | None = None


class OutputSlice(Strict):
    """``slices[i]``: output layers merged from equally long input slices."""

    sources: list[InputSlice] = Field(min_length=1)
    base_model: ModelRef | None = None
    residual_weight: float | None = None
    parameters: Parameters | None = None


class OutputModule(Strict):
    """``modules.<name>``: mergekit's per-module form (parsed; the native engine may refuse it)."""

    slices: list[OutputSlice] | None = None
    models: list[InputModel] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _one_input_form(self) -> OutputModule:
        if bool(self.slices) == bool(self.models):
            raise _fail(
                "recipe_semantics",
                "a module has either slices or models",
                "give the module exactly one of slices: or models:",
            )
        return self


class ModelTokenEmbedding(Strict):
    """Embedding of a token taken from a model: ``{kind: model_token, model, token_id | token}``."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise _fail(
                "token_source",
                "a model_token source names exactly one of token_id or token",
                "write token: <the token> or token_id: <its id>",
            )
        return self


class ZeroEmbedding(Strict):
    """A zero embedding: ``{kind: zero}``."""

    kind: Literal["zero"]


def _token_source_kind(value: Any) -> str | None:
    if value is None:
        return "~none"
    if isinstance(value, str):
        return "~model"
    if isinstance(value, ModelTokenEmbedding):
        return "~model_token"
    if isinstance(value, ZeroEmbedding):
        return "~zero"
    if isinstance(value, dict) and value.get("kind") in ("model_token", "zero"):
        return "~" + value["kind"]
    return None


TokenSource = Annotated[
    Annotated[None, Tag("~none")]
    | Annotated[ModelRef, Tag("~model")]
    | Annotated[ModelTokenEmbedding, Tag("~model_token")]
    | Annotated[ZeroEmbedding, Tag("~zero")],
    Discriminator(
        _token_source_kind,
        custom_error_type="token_source",
        custom_error_message=(
            "a token source is a model reference, {kind: model_token, model, token | token_id} "
            "or {kind: zero}"
        ),
    ),
]


class TokenEmbeddingConfig(Strict):
    """``tokenizer.tokens.<token>``: where the embedding of one token comes from."""

    source: TokenSource = None
    force: bool = False


class TokenizerConfig(Strict):
    """``tokenizer:``: mergekit's tokenizer block (source, tokens, pad_to_multiple_of)."""

    source: TokenizerSource = "union"
    tokens: dict[str, TokenEmbeddingConfig] | None = None
    pad_to_multiple_of: Annotated[int | None, BeforeValidator(_check_positive_int)] = None


class MergeRecipe(Strict):
    """A mergekit recipe. Exactly one of ``models``, ``slices`` or ``modules``."""

    merge_method: str
    base_model: ModelRef | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    parameters: Parameters | None = None
    dtype: DType = None
    out_dtype: DType = None
    tokenizer_source: TokenizerSource = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    #: mergekit-multimerge's stage name (merger.core.multidoc); a single recipe ignores it.
    name: str | None = None

    @model_validator(mode="after")
    def _semantics(self) -> MergeRecipe:
        problems = _semantic_problems(self.model_dump(mode="python"))
        if problems:
            lines = [f"{format_loc(loc)}: {msg}" if loc else msg for loc, msg, _ in problems]
            hints = dict.fromkeys(hint for _, _, hint in problems if hint)
            raise _fail("recipe_semantics", "\n".join(lines), "\n".join(hints))
        return self

    def referenced_models(self) -> list[str]:
        """Models whose tensors the merge reads: base first, then in order of appearance.

        Includes ``models``, slice sources, slice-level ``base_model`` and modules; not the
        tokenizer-only models (see :meth:`tokenizer_models`). Deduplicated by the raw string.
        """
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for models, slices in _input_groups(self):
            for m in models or []:
                refs.append(m.model)
            for s in slices or []:
                refs.extend(src.model for src in s.sources)
                if s.base_model:
                    refs.append(s.base_model)
        return list(dict.fromkeys(refs))

    def tokenizer_models(self) -> list[str]:
        """Models read only for their tokenizer or token embeddings (``tokenizer_source`` & co)."""
        refs: list[str] = []
        for source in (self.tokenizer_source, self.tokenizer.source if self.tokenizer else None):
            if source not in (None, "base", "union"):
                refs.append(source)
        for tok in (self.tokenizer.tokens or {}).values() if self.tokenizer else []:
            if isinstance(tok.source, str):
                refs.append(tok.source)
            elif isinstance(tok.source, ModelTokenEmbedding):
                refs.append(tok.source.model)
        return list(dict.fromkeys(refs))


def _input_groups(
    recipe: MergeRecipe,
) -> Iterator[tuple[list[InputModel] | None, list[OutputSlice] | None]]:
    yield recipe.models, recipe.slices
    for module in (recipe.modules or {}).values():
        yield module.models, module.slices


# --------------------------------------------------------------------------------------------
# Semantic checks, on raw (possibly malformed) data: they run in every parse, so their problems
# are reported together with the schema's.
# --------------------------------------------------------------------------------------------

SemanticProblem = tuple[Loc, str, str]  # (where, what, hint)


def _semantic_problems(data: Mapping[str, Any]) -> list[SemanticProblem]:
    problems: list[SemanticProblem] = []
    forms = [k for k in ("models", "slices", "modules") if data.get(k)]
    if not forms:
        problems.append(
            (
                (),
                "no models, slices or modules: nothing to merge",
                "add models: (a list of - model: ...) or slices: (with sources and layer_range)",
            )
        )
    elif len(forms) > 1:
        problems.append(
            (
                (forms[1],),
                f"both {forms[0]} and {forms[1]} given: a recipe has exactly one of models, "
                "slices or modules",
                f"keep {forms[0]}: or {forms[1]}:, not both",
            )
        )
    modules = data.get("modules")
    for name, module in modules.items() if isinstance(modules, Mapping) else []:
        if isinstance(module, Mapping) and bool(module.get("slices")) == bool(module.get("models")):
            problems.append(
                (
                    ("modules", name),
                    "a module has exactly one of slices or models",
                    "give the module slices: or models:, not both or neither",
                )
            )
    if data.get("tokenizer_source") and data.get("tokenizer"):
        problems.append(
            (
                ("tokenizer",),
                "both tokenizer_source and tokenizer given",
                "use tokenizer: {source: ...} alone, or tokenizer_source: alone",
            )
        )
    method = data.get("merge_method")
    specs = declared(method) if isinstance(method, str) else None
    known = {p.name: p for p in specs} if specs is not None else None
    for loc, params in _parameter_blocks(data):
        for name, setting in params.items():
            if not isinstance(name, str):
                continue
            if known is not None and name not in known:
                close = difflib.get_close_matches(name, list(known), n=1)
                takes = ", ".join(sorted(known)) or "no parameters"
                problems.append(
                    (
                        (*loc, name),
                        f"unknown key: {method} takes {takes}",
                        f"did you mean {close[0]!r}?"
                        if close
                        else f"remove {name!r}; {method} does not use it",
                    )
                )
                continue
            if known is not None:
                problems.extend(_value_problems((*loc, name), known[name], setting))
    return problems


def _parameter_blocks(data: Mapping[str, Any]) -> Iterator[tuple[Loc, Mapping[str, Any]]]:
    def blocks(node: Any, loc: Loc) -> Iterator[tuple[Loc, Mapping[str, Any]]]:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "parameters" and isinstance(value, Mapping):
                    yield (*loc, key), value
                elif key in ("models", "slices", "sources") and isinstance(value, list):
                    for i, item in enumerate(value):
                        yield from blocks(item, (*loc, key, i))
                elif key == "modules" and isinstance(value, Mapping) and not loc:
                    for name, module in value.items():
                        yield from blocks(module, (*loc, key, name))

    return blocks(data, ())


def _leaves(setting: Any, loc: Loc) -> Iterator[tuple[Loc, Any]]:
    if isinstance(setting, ConditionalParameter):
        setting = setting.model_dump()
    if isinstance(setting, Mapping):
        if "value" in setting:
            yield from _leaves(setting["value"], (*loc, "value"))
    elif isinstance(setting, (list, tuple)):
        for i, item in enumerate(setting):
            yield from _leaves(item, (*loc, i))
    elif isinstance(setting, _SCALAR_TYPES):
        yield loc, setting


@functools.cache
def _adapter(tp: type) -> TypeAdapter[Any]:
    return TypeAdapter(tp)


def _value_problems(loc: Loc, spec: ParamSpec, setting: Any) -> list[SemanticProblem]:
    """Every literal value of a setting checked against the declared type and range."""
    problems: list[SemanticProblem] = []
    for where, raw in _leaves(setting, loc):
        try:
            value = _adapter(spec.kind).validate_python(raw)
        except ValidationError:
            what = {float: "a number", int: "an integer", bool: "true or false"}[spec.kind]
            problems.append((where, f"{spec.name} must be {what}, got {raw!r}", ""))
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if spec.has_range and number and not spec.in_range(value):
            span = spec.range_text()
            problems.append(
                (
                    where,
                    f"{spec.name} must be in {span}, got {raw!r}",
                    spec.hint or f"set {spec.name} within {span}",
                )
            )
    return problems


# --------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, then pydantic, then one RecipeError with every problem
# --------------------------------------------------------------------------------------------


#: One problem of a recipe file (`kruising.config.Problem`: source, line, path, message, hint).
RecipeProblem = Problem


class RecipeError(KruisingError):
    """A recipe that does not parse or validate; ``problems`` holds each one with its line."""

    def __init__(self, problems: Sequence[RecipeProblem]) -> None:
        self.problems = list(problems)
        hints = list(dict.fromkeys(p.hint for p in self.problems if p.hint))
        super().__init__("\n".join(str(p) for p in self.problems), "\n".join(hints) or _SCHEMA_HINT)


def _unwrap(tp: Any) -> list[Any]:
    """The concrete types behind Annotated / Optional / Union."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _unwrap(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [t for arg in get_args(tp) for t in _unwrap(arg)]
    return [tp]


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The schema class that the data at ``loc`` is validated against (for key suggestions)."""
    candidates: list[Any] = [MergeRecipe]
    for part in loc:
        nxt: list[Any] = []
        for tp in candidates:
            for t in _unwrap(tp):
                origin = get_origin(t)
                if isinstance(t, type) and issubclass(t, BaseModel):
                    if isinstance(part, str) and part in t.model_fields:
                        nxt.append(t.model_fields[part].annotation)
                elif origin in (list, tuple) and isinstance(part, int):
                    nxt.append(get_args(t)[0])
                elif origin is dict and isinstance(part, str):
                    nxt.append(get_args(t)[1])
        candidates = nxt
    for tp in candidates:
        for t in _unwrap(tp):
            if isinstance(t, type) and issubclass(t, BaseModel):
                return t
    return None


def _problem_from_error(
    err: Mapping[str, Any], lines: Mapping[Loc, int], source: str
) -> RecipeProblem:
    loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("~")))
    kind = err["type"]
    hint = (err.get("ctx") or {}).get("hint", "")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        fields = list(model.model_fields) if model else []
        key = str(loc[-1])
        close = [_KEY_ALIASES[key]] if _KEY_ALIASES.get(key) in fields else []
        close = close or difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
        message = "unknown key"
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif fields:
            hint = "valid keys here: " + ", ".join(fields)
    elif kind == "missing":
        message = "missing required key"
        hint = hint or f"add {loc[-1]}:" if loc else ""
    elif kind in ("model_ref", "dtype", "tokenizer_source", "layer_range", "recipe_semantics"):
        message = err["msg"]
    elif kind in ("invalid_setting", "invalid_value", "token_source", "positive_int"):
        message = f"{err['msg']}, got {err.get('input')!r}"
    else:
        msg = err["msg"]
        message = msg[:1].lower() + msg[1:]
        if not isinstance(err.get("input"), (dict, list)):
            message += f", got {err.get('input')!r}"
    return RecipeProblem(
        source=source,
        line=line_of(loc, lines),
        path=format_loc(loc),
        message=message,
        hint=hint,
    )


def parse_recipe(text: str, source: str = "<recipe>") -> MergeRecipe:
    """Parse recipe YAML; raise :class:`RecipeError` (a ``KruisingError``) listing every problem.

    ``source`` names the file in messages (``recipe.yaml:7: models[1].model: ...``).
    """
    data, lines, problems = compose_yaml(text, source)
    for problem in problems:
        if problem.message == INVALID_YAML + SEVERAL_DOCUMENTS:
            problem.message += ": a multi-stage recipe (mergekit-multimerge) runs with merge run"
    if not problems and data is None:
        problems.append(
            RecipeProblem(
                source=source,
                line=1,
                path="",
                message="empty recipe",
                hint="write at least merge_method: and models: (or slices:)",
            )
        )
    if not problems and not isinstance(data, dict):
        problems.append(
            RecipeProblem(
                source=source,
                line=lines[()],
                path="",
                message=f"a recipe is a mapping of keys, got a {type(data).__name__}",
                hint=_SCHEMA_HINT,
            )
        )
    if problems and (data is None or not isinstance(data, dict)):
        raise RecipeError(problems)
    return _validate(data, lines, source, problems)


def validate_recipe(data: Mapping[str, Any], source: str = "<recipe>") -> MergeRecipe:
    """Validate a recipe given as data (a sweep variant, a card's front matter).

    Same checks and one :class:`RecipeError` as :func:`parse_recipe`; problems name the field
    (``<recipe>: models[1].parameters.density: ...``) but no line.
    """
    if not isinstance(data, Mapping):
        problem = RecipeProblem(
            source=source,
            line=None,
            path="",
            message=f"a recipe is a mapping of keys, got a {type(data).__name__}",
            hint=_SCHEMA_HINT,
        )
        raise RecipeError([problem])
    return _validate(dict(data), {}, source, [])


def _validate(
    data: dict[str, Any], lines: Mapping[Loc, int], source: str, problems: list[RecipeProblem]
) -> MergeRecipe:
    semantic = [
        RecipeProblem(
            source=source,
            line=line_of(loc, lines),
            path=format_loc(loc),
            message=message,
            hint=hint,
        )
        for loc, message, hint in _semantic_problems(data)
    ]
    try:
        recipe = MergeRecipe.model_validate(data)
    except ValidationError as exc:
        problems.extend(
            _problem_from_error(err, lines, source)
            for err in exc.errors()
            if err["type"] != "recipe_semantics"  # the raw pass reports these, with lines
        )
        recipe = None
    problems.extend(semantic)
    if problems:
        unique = {(p.line, p.path, p.message): p for p in problems}
        raise RecipeError(sorted(unique.values(), key=lambda p: p.line or 0))
    assert recipe is not None
    return recipe


def load_recipe(path: Path) -> MergeRecipe:
    """Read and parse a recipe file; errors name the file, the line and the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KruisingError(
            f"recipe not found: {path}", "check the path; recipes usually end in .yml or .yaml"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KruisingError(
            f"cannot read recipe {path}: {exc}", "is it a UTF-8 text file?"
        ) from None
    return parse_recipe(text, source=str(path))


def recipe_to_yaml(recipe: MergeRecipe) -> str:
    """The recipe as mergekit YAML (unset fields left out); ``parse_recipe`` gives it back equal."""
    data = recipe.model_dump(mode="json", exclude_none=True, exclude_defaults=False)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=None)


# --------------------------------------------------------------------------------------------
# Model references and dtypes
# --------------------------------------------------------------------------------------------


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; a local path → ``(path, None)``.

    Raises ``KruisingError`` for mergekit's LoRA syntax (``model+lora``: a plain model is
    expected here; the merge inputs take it, merger.core.adapter) and malformed refs.
    """
    try:
        _check_plain_ref(ref)
    except PydanticCustomError as exc:
        raise KruisingError(exc.message(), (exc.context or {}).get("hint", "")) from None
    path, _, revision = ref.partition("@")
    return path, revision or None


def canonical_dtype(name: str | None) -> str | None:
    """``"torch.bfloat16"`` → ``"bfloat16"``; ``None`` for a name mergekit does not accept."""
    if not isinstance(name, str):
        return None
    bare = name.removeprefix("torch.")
    return bare if bare in DTYPES else None


# --------------------------------------------------------------------------------------------
# Parameter resolution, mergekit's semantics
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(
    tensor_name: str,
    setting: Any,
    t: float = 0.0,
    *,
    validate: Callable[[Any], Any] | None = None,
) -> Any:
    """Resolve one parameter setting for a tensor at depth ``t`` (0 = first layer, 1 = last).

    - scalar: itself;
    - gradient ``[v0, ..., vn-1]``: numeric → linear interpolation at ``scaled = t * (n-1)``
      between ``v[int(scaled)]`` and the next; non-numeric → ``v[int(t * (n-1))]``;
    - ``{filter, value}`` or a list of them: the first entry whose ``filter`` is ``None``, ``"*"``
      or a substring of ``tensor_name`` wins and its value is evaluated; no match → ``None``;
    - an empty list → ``None`` (the next scope decides).

    ``validate`` converts each scalar as the parameter's type does (e.g. ``float``, so the YAML
    string ``"1e-3"`` counts as a number, as in mergekit); without it values are taken as parsed.
    """
    check = validate or (lambda v: v)
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, _SCALAR_TYPES):
        return check(setting)
    if not isinstance(setting, (list, tuple)):
        raise TypeError(f"not a parameter setting: {setting!r}")
    if not setting:
        return None
    if all(isinstance(v, _SCALAR_TYPES) for v in setting):
        values = [check(v) for v in setting]
        last = len(values) - 1
        if not all(_is_number(v) for v in values):
            return values[int(t * last)]
        scaled = t * last
        i0 = int(scaled)
        i1 = min(last, i0 + 1)
        frac = scaled - i0
        return check((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        if not isinstance(cond, ConditionalParameter):
            cond = ConditionalParameter.model_validate(cond)
        if (
            cond.filter is None
            or cond.filter == "*"
            or (tensor_name and cond.filter in tensor_name)
        ):
            return evaluate_setting(tensor_name, cond.value, t, validate=validate)
    return None
