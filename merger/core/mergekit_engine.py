"""`merge run --engine mergekit`: the recipe handed to mergekit 0.1.5's Python API as written.

mergekit accepts more than our strict parser (merger.core.recipe): keys it does not know (it
drops them), values we refuse natively (``override_architecture``, ``dtype: int64``, a density
above 1). With this engine our parser's findings are warnings, one line
each, ``warning: recipe.yml:7: models[0].parameters.densty: unknown key``, and only what
mergekit itself rejects is an error — checked before any work, with mergekit's own code: its
``MergeConfiguration``, its dtype names, and its planner (``MergePlanner._plan``, which reads
the inputs' configs, not their tensors). The error is one line and a hint; no child is left.

mergekit's options: ``--trust-remote-code``, ``--allow-crimes``, ``--lora-merge-cache``,
``--lora-merge-dtype``, ``--copy-tokenizer/--no-copy-tokenizer``, ``--seed`` (``random_seed``),
``--device`` (``device`` and ``cuda``), ``--out-shard-size`` (bytes: mergekit 0.1.5's
``TensorWriter`` counts ``numel * element_size`` against ``out_shard_size``, whatever its help
says about parameters), and ``--mergekit-option KEY=VALUE`` for every other field of mergekit's
``MergeOptions``, checked against its fields and types. The native engine takes the ones that
mean something to it (`check_native`) and refuses the rest.

A multi-document recipe (mergekit-multimerge) runs every stage through mergekit, in dependency
order, with no native planning (`run_stages_with_mergekit`).
"""

from __future__ import annotations

import difflib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kruising.console import console
from kruising.errors import KruisingError
from merger.core.options import MergeOptions

#: mergekit MergeOptions fields that `merge run` sets from a flag of its own (or owns)
OWN_FLAGS = {
    "device": "--device",
    "cuda": "--device cuda",
    "gpu_rich": "--device cuda and --mergekit-option low_cpu_memory=true read_to_gpu=true "
    "multi_gpu=true",
    "out_shard_size": "--out-shard-size",
    "random_seed": "--seed",
    "lora_merge_cache": "--lora-merge-cache",
    "lora_merge_dtype": "--lora-merge-dtype",
    "trust_remote_code": "--trust-remote-code",
    "allow_crimes": "--allow-crimes",
    "copy_tokenizer": "--copy-tokenizer/--no-copy-tokenizer",
    "write_model_card": "nothing: kruising writes the child's model card itself",
}
ENGINE_HINT = "drop it, or run with --engine mergekit"


def _fields() -> dict[str, Any]:
    from mergekit.options import MergeOptions as MergekitOptions

    return MergekitOptions.model_fields


def mergekit_option_values(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """``--mergekit-option KEY=VALUE`` pairs, each checked against mergekit's MergeOptions
    (the field exists, has no flag of ours, and its value has the field's type)."""
    import pydantic
    from mergekit.options import MergeOptions as MergekitOptions

    fields = _fields()
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in OWN_FLAGS:
            raise KruisingError(
                f"--mergekit-option {key}: merge run has its own flag for it",
                f"use {OWN_FLAGS[key]}",
            )
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            raise KruisingError(
                f"--mergekit-option {key}: mergekit's MergeOptions has no field {key!r}",
                f"did you mean {close[0]!r}?"
                if close
                else "its fields: " + ", ".join(k for k in fields if k not in OWN_FLAGS),
            )
        try:
            parsed = MergekitOptions.model_validate({key: value})
        except pydantic.ValidationError as exc:
            message = exc.errors()[0]["msg"]
            kind = str(fields[key].annotation).replace("typing.", "")
            raise KruisingError(
                f"--mergekit-option {key}={value}: {message}",
                f"{key} is {kind} in mergekit's MergeOptions",
            ) from None
        values[key] = getattr(parsed, key)
    return values


def split_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the CLI's ``--mergekit-option``), the key's dashes as underscores."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise KruisingError(
            f"--mergekit-option {text!r} is not KEY=VALUE",
            "e.g. --mergekit-option clone_tensors=true",
        )
    return key.strip().replace("-", "_"), value.strip()


def check_native(options: MergeOptions) -> None:
    """The mergekit options that mean nothing to the native engine: an error, never ignored."""
    if options.mergekit_options:
        key = options.mergekit_options[0][0]
        raise KruisingError(
            f"--mergekit-option {key}: mergekit's options are for --engine mergekit; the native "
            "engine has its own flags (merge run --help)",
            ENGINE_HINT,
        )
    if options.trust_remote_code:
        raise KruisingError(
            "--trust-remote-code means nothing to the native engine: it runs no model code "
            "(it reads safetensors, config.json and tokenizer files)",
            ENGINE_HINT,
        )
    if options.allow_crimes:
        raise KruisingError(
            "--allow-crimes: the native engine merges models of one architecture only",
            "run with --engine mergekit --allow-crimes to mix architectures",
        )


def check_lora_dtype(name: str | None) -> str | None:
    """``--lora-merge-dtype``: a name mergekit's ``dtype_from_name`` takes (float kinds)."""
    from merger.core.recipe import DTYPES, canonical_dtype

    if name is None:
        return None
    canonical = canonical_dtype(name)
    if canonical is None:
        raise KruisingError(
            f"--lora-merge-dtype {name!r} is not a dtype mergekit knows",
            "use one of " + ", ".join(DTYPES),
        )
    return canonical


# --- the recipe: our findings as warnings, mergekit's rejections as errors ---------------------


def warn(message: str) -> None:
    """``warning: <message>`` on stderr, on one line however long."""
    from rich.text import Text

    console.print(Text.assemble(("warning: ", "bold yellow"), message), soft_wrap=True)


def warn_findings(text: str, source: str) -> None:
    """Our strict parser's problems with ``text``, printed as warnings (one line each)."""
    from merger.core.multidoc import is_multi_document, parse_documents
    from merger.core.recipe import RecipeError, parse_recipe

    try:
        if is_multi_document(text):
            parse_documents(text, source)
        else:
            parse_recipe(text, source)
    except RecipeError as exc:
        for problem in exc.problems:
            if problem.message.startswith("invalid YAML"):
                continue  # mergekit's own check reports it, as an error
            warn(f"{problem} (passed to mergekit as written)")


def _one_line(exc: BaseException) -> str:
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        return "; ".join(dict.fromkeys(parts))
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _rejected(where: str, exc: BaseException | str) -> KruisingError:
    what = exc if isinstance(exc, str) else _one_line(exc)
    return KruisingError(
        f"{where}: mergekit rejects the recipe: {what}",
        "fix the recipe (this is mergekit 0.1.5's own check; nothing was written)",
    )


def mergekit_config(data: Any, where: str):
    """``data`` (a YAML document) as mergekit's MergeConfiguration, its dtypes and method
    checked as mergekit checks them; one-line error otherwise."""
    from mergekit import merge_methods
    from mergekit.common import dtype_from_name
    from mergekit.config import MergeConfiguration

    if not isinstance(data, dict):
        raise _rejected(where, "it is not a mapping of keys (merge_method, models, ...)")
    try:
        config = MergeConfiguration.model_validate(data)
        dtype_from_name(config.dtype)
        dtype_from_name(config.out_dtype)
        merge_methods.get(config.merge_method)
    except Exception as exc:  # mergekit raises RuntimeError, ValueError, ValidationError
        raise _rejected(where, exc) from None
    return config


def mergekit_options(options: MergeOptions, device, max_shard: int, extra: dict[str, Any]):
    from mergekit.options import MergeOptions as MergekitOptions

    return MergekitOptions(
        device=str(device),
        cuda=device.type == "cuda",
        # bytes: mergekit 0.1.5's TensorWriter compares numel * element_size with it
        out_shard_size=max_shard,
        random_seed=options.seed,
        copy_tokenizer=options.copy_tokenizer,
        write_model_card=False,
        quiet=not options.progress,
        lora_merge_cache=options.lora_merge_cache,
        lora_merge_dtype=options.lora_merge_dtype,
        trust_remote_code=options.trust_remote_code,
        allow_crimes=options.allow_crimes,
        **extra,
    )


def dry_plan(config, mk_options, where: str) -> None:
    """mergekit's own planning (architecture, output config, every tensor's task) without
    reading a tensor or writing a byte; what it raises is mergekit rejecting the recipe.

    A ``model+lora`` input is not merged here (mergekit does it when it loads it)."""
    from mergekit.architecture import get_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import _model_out_config
    from mergekit.plan import MergePlanner

    if not mk_options.lora_merge_cache and any(m.lora for m in config.referenced_models()):
        # mergekit's own refusal (ModelReference.merged), raised only once it loads the input
        error = _rejected(where, RuntimeError("Need to specify cache dir to merge adapters"))
        raise KruisingError(
            error.message,
            "pass --lora-merge-cache DIR (mergekit merges each model+lora input there first)",
        )
    try:
        arch = get_architecture_info(config, mk_options)
        LoaderCache().setup(options=mk_options)
        out_config = _model_out_config(config, arch, trust_remote_code=mk_options.trust_remote_code)
        MergePlanner(config, arch, options=mk_options, out_model_config=out_config)._plan()
    except Exception as exc:
        raise _rejected(where, exc) from None


def summary_recipe(config):
    """Our MergeRecipe shape of mergekit's config, for the card and the provenance (method,
    base model, dtype, the models read); not validated: mergekit's config is the recipe."""
    from merger.core.recipe import InputModel, MergeRecipe

    models = [InputModel.model_construct(model=str(m)) for m in config.referenced_models()]
    models.sort(key=lambda m: m.model)
    return MergeRecipe.model_construct(
        merge_method=config.merge_method,
        base_model=str(config.base_model) if config.base_model else None,
        models=models,
        slices=None,
        modules=None,
        parameters=None,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        tokenizer_source=None,
        tokenizer=None,
        chat_template=config.chat_template,
        name=None,
    )


def _fingerprint_sources(config, options: MergeOptions) -> dict[str, Any]:
    """The inputs, opened from their shard headers for the provenance's fingerprints (a
    ``model+lora`` input: its model). Pickle checkpoints still need --allow-pickle."""
    from merger.core.io import open_model

    sources = {}
    for ref in config.referenced_models():
        name = str(ref.model)
        if name not in sources:
            sources[name] = open_model(name, allow_pickle=options.allow_pickle)
    return sources


# --- running ---------------------------------------------------------------------------------


def run_with_mergekit(
    text: str, source: str, out: Path, options: MergeOptions, *, recipe_text: str | None = None
) -> Path:
    """`merge run --engine mergekit` of one recipe: warnings, mergekit's checks, then the merge."""
    import yaml

    from kruising.device import resolve_device
    from merger.core.io import parse_size

    console.print("engine mergekit: importing mergekit (a few seconds)")
    extra = mergekit_option_values(options.mergekit_options)
    device = resolve_device(options.device)
    max_shard = parse_size(options.out_shard_size)
    warn_findings(text, source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _rejected(source, exc) from None
    config = mergekit_config(data, source)
    mk_options = mergekit_options(options, device, max_shard, extra)
    dry_plan(config, mk_options, source)
    return _merge(config, recipe_text or text, Path(out), options, mk_options, str(device))


def forget_loaders() -> None:
    """Empty mergekit's process-wide loader cache (`LoaderCache.loaders`, a class attribute
    keyed by model reference and never emptied): else a second merge in this process reads
    the first one's loaders — a ``model+lora`` merged with another ``lora_merge_dtype`` or
    cache, or a folder merged again since (a stage of a multi-document recipe)."""
    from mergekit.io.tasks import LoaderCache

    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()


def _merge(config, recipe_text: str, out: Path, options: MergeOptions, mk_options, device) -> Path:
    from mergekit.merge import run_merge

    from merger.core import output
    from merger.core.child import write_provenance
    from merger.core.engine import write_child_files

    sources = _fingerprint_sources(config, options)
    try:
        inputs = [s.path for s in sources.values()]
        output.check_not_an_input(out, inputs)
        tmp = output.prepare(out, overwrite=options.overwrite, inputs=inputs)
        started = time.perf_counter()
        try:
            if (
                not options.copy_tokenizer
                and config.chat_template
                and not (config.tokenizer or config.tokenizer_source)
            ):
                warn(
                    "--no-copy-tokenizer: the recipe's chat_template is not saved (no tokenizer "
                    "is written; mergekit says so too)"
                )
            forget_loaders()
            run_merge(config, str(tmp), options=mk_options, config_source=recipe_text)
            recipe = summary_recipe(config)
            write_child_files(tmp, recipe, recipe_text, None)
            write_provenance(
                tmp,
                recipe,
                sources,
                None,
                recipe_text=recipe_text,
                device=device,
                seconds=time.perf_counter() - started,
                engine="mergekit",
                seed=options.seed,
            )
            output.commit(tmp, out, overwrite=options.overwrite)
        except KruisingError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception):
                raise KruisingError(
                    f"mergekit failed: {_one_line(exc)}",
                    "run with --verbose for mergekit's traceback",
                ) from exc
            raise
    finally:
        for s in sources.values():
            s.close()
    console.print(f"wrote {out} with mergekit in {time.perf_counter() - started:.1f} s")
    return out


# --- multi-document recipes ------------------------------------------------------------------


@dataclass
class MergekitStage:
    name: str | None
    config: Any  # mergekit's MergeConfiguration, stage names patched to their folders
    text: str  # its YAML (mergekit's to_yaml): the stage child's mergekit_config.yml
    out: Path
    needs: list[str]
    line: int


def load_mergekit_stages(text: str, source: str, out: Path, folder: Path) -> list[MergekitStage]:
    """Every document checked by mergekit, names patched as mergekit-multimerge patches them
    (``patched_config``: every string that is a model reference to a stage), ordered."""
    import yaml
    from mergekit.scripts.multimerge import patched_config

    from merger.core.multidoc import Stage, _ordered, split_documents

    docs = split_documents(text) or []
    configs: dict[str | None, tuple[int, Any]] = {}
    for line, body in docs:
        where = f"{source}:{line}"
        try:
            data = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            raise _rejected(where, exc) from None
        name = data.pop("name", None) if isinstance(data, dict) else None
        if name in configs:
            what = "a second unnamed document" if name is None else f"name {name!r}"
            raise KruisingError(
                f"{where}: mergekit rejects the recipe: {what} (the first at line "
                f"{configs[name][0]})",
                "give every stage its own name; only the final merge has none",
            )
        configs[name] = (line, mergekit_config(data, where))
    names = {n for n in configs if n is not None}
    final = None if None in configs else list(configs)[-1]
    stages: dict[str | None, Stage] = {}
    patched: dict[str | None, MergekitStage] = {}
    for name, (line, config) in configs.items():
        config, used = patched_config(config, names, str(folder))
        where = out if name == final else Path(folder) / str(name)
        needs = sorted(used)
        patched[name] = MergekitStage(name, config, config.to_yaml() + "\n", where, needs, line)
        stages[name] = Stage(name, None, "", where, needs)  # for the ordering
    if final is not None:
        readers = [n for n, s in patched.items() if final in s.needs]
        if readers:
            raise KruisingError(
                f"{source}: stage {readers[0]!r} reads {final!r}, the last document, which is "
                "the one written to --out",
                "add a final merge without a name (mergekit-multimerge's output)",
            )
    return [patched[s.name] for s in _ordered(stages, source)]


def run_stages_with_mergekit(
    text: str, source: str, out: Path, options: MergeOptions, intermediate_dir: Path | None
) -> Path:
    """A multi-document recipe, every stage merged by mergekit in dependency order.

    Every document is checked by mergekit before the first merge; a stage whose inputs
    exist already (no stage it reads is merged in this run) is also planned by mergekit's
    planner up front, the others just before they run (their inputs are not there yet).
    An intermediate is reused when complete and made from the same stage recipe.
    """

    from kruising.device import resolve_device
    from merger.core.io import parse_size
    from merger.core.multidoc import announce_stages, is_complete, merge_stages, stage_folders

    console.print("engine mergekit: importing mergekit (a few seconds)")
    out, folder = stage_folders(out, intermediate_dir, options)
    extra = mergekit_option_values(options.mergekit_options)
    device = resolve_device(options.device)
    mk_options = mergekit_options(options, device, parse_size(options.out_shard_size), extra)
    warn_findings(text, source)
    stages = load_mergekit_stages(text, source, out, folder)
    announce_stages(stages, folder)
    to_merge: set[str] = set()
    for stage in stages:
        reused = (
            stage.name is not None
            and is_complete(stage.out)
            and not (set(stage.needs) & to_merge)
            and (stage.out / "mergekit_config.yml").is_file()
            and (stage.out / "mergekit_config.yml").read_text() == stage.text
        )
        if not reused:
            to_merge.add(str(stage.name))
        if not set(stage.needs) & to_merge:
            dry_plan(stage.config, mk_options, f"{source}:{stage.line}")

    def merge(stage, stage_options) -> None:
        if set(stage.needs) & to_merge:  # its inputs exist now: mergekit's planner on them
            dry_plan(stage.config, mk_options, f"{source}:{stage.line}")
        _merge(stage.config, stage.text, stage.out, stage_options, mk_options, str(device))

    return merge_stages(stages, out, folder, options, to_merge, merge, tag=" (mergekit)")
