"""The `pretrain run` config: a strict pydantic model read from YAML.

Unknown keys are errors; every problem of a file, field or cross-field, is reported at once, each
with its line. Relative paths in a config are relative to the current directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, model_validator

from kruising.config import INVALID_YAML, Loc, Strict, compose_yaml, format_loc, line_of
from pretrain.errors import PretrainError

#: Text normalisation steps a source can ask for, applied to every document in this order.
#: ``literal_escapes``: the two-character sequences backslash-n and backslash-t become a newline
#: and a tab (MADLAD-400 stores its documents with literal escapes; GEITje replaced them).
#: ``nfc``: Unicode NFC (composed accents: é as one code point).
Normalize = Literal["literal_escapes", "nfc"]


class Source(Strict):
    """One corpus: local files (glob), a Hub dataset (streamed), or the built-in fact world."""

    path: str | None = Field(
        None, description="glob of local .txt / .jsonl / .json / .parquet files"
    )
    hub: str | None = Field(None, description="Hub dataset id, streamed, e.g. allenai/madlad-400")
    hub_config: str | None = Field(None, description="Hub dataset config name, e.g. nl")
    split: str = "train"
    world: Literal["nl", "en", "chat-en"] | None = Field(
        None, description="documents from pretrain.world (the tiny family's generator)"
    )
    documents: int = Field(2000, gt=0, description="number of documents for a world source")
    document: Literal["line", "paragraph", "file"] = Field(
        "line",
        description=".txt files: one document per line (default), per blank-line-separated "
        "paragraph, or per file",
    )
    text_field: str = "text"
    messages_field: str | None = Field(
        None, description="a field holding chat messages, rendered with the chat template"
    )
    normalize: list[Normalize] = Field(
        default_factory=list, description="text normalisation steps, e.g. [literal_escapes]"
    )
    weight: float = Field(1.0, gt=0, description="mixture weight (relative)")
    tokens: int | None = Field(
        None, gt=0, description="token budget: this source contributes this many tokens"
    )
    epochs: float | None = Field(
        None, gt=0, description="token budget as passes over the source (counted at the start)"
    )
    sample: float = Field(
        1.0, gt=0, le=1, description="keep each document with this probability (seeded)"
    )
    shuffle_buffer: int = Field(
        0, ge=0, description="documents in a seeded shuffle buffer (0: stream order)"
    )

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Source:
        if not (info.context or {}).get("cross_checked"):
            problems = _source_problems(self.model_dump(exclude_unset=True))
            if problems:
                raise ValueError("; ".join(msg for _, msg in problems))
        return self

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path
        if self.hub is not None:
            return self.hub + (f"/{self.hub_config}" if self.hub_config else "")
        return f"world:{self.world}"

    @property
    def budgeted(self) -> bool:
        return self.tokens is not None or self.epochs is not None


class PretrainConfig(Strict):
    """Continue (or start) a Mistral model on a corpus; see recipes/pretrain/ for examples."""

    # what to start from: exactly one of init_from, model, resume
    init_from: str | None = Field(None, description="checkpoint folder or Hub id (weights only)")
    model: dict[str, Any] | None = Field(
        None, description="MistralConfig fields: train from scratch"
    )
    resume: str | None = Field(None, description="'latest' or a checkpoint folder of this run")
    tokenizer: str | None = Field(
        None, description="folder, Hub id or 'mistral-common'; default: the init_from checkpoint"
    )
    output_dir: str

    # data
    sources: list[Source] = Field(min_length=1)
    context_length: int = Field(gt=1)
    add_bos: bool = True
    loss_on_eos: bool = Field(
        True, description="train on predicting EOS (false: EOS targets are masked, as GEITje)"
    )
    document_attention: bool = Field(
        False, description="position ids restart per document, attention stays inside documents"
    )
    holdout_docs: int = Field(0, ge=0, description="first N documents of each source: eval only")
    chat_template: str | None = None

    # optimisation
    optimizer: Literal["adamw", "adamw_bnb_8bit"] = Field(
        "adamw", description="torch AdamW, or bitsandbytes' 8-bit AdamW (CUDA only)"
    )
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the decay ends at lr x this")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    micro_batch: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)

    # hardware
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="autocast (mixed precision) dtype of the forward and backward"
    )
    weights_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype the weights are loaded, trained and saved in"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    compile: bool = Field(False, description="torch.compile the model (GPU; a minute of warm-up)")
    seed: int = 0

    # observability and checkpoints
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_batches: int = Field(4, gt=0)
    checkpoint_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    progress: bool = True
    plot: bool = True

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> PretrainConfig:
        if not (info.context or {}).get("cross_checked"):
            problems = cross_field_problems(self.model_dump(exclude_unset=True))
            if problems:
                raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step on one process (multiply by the number of processes)."""
        return self.micro_batch * self.grad_accum * self.context_length

    def total_steps(self, world_size: int = 1) -> int:
        if self.max_steps is not None:
            return self.max_steps
        assert self.max_tokens is not None
        return max(1, math.ceil(self.max_tokens / (self.tokens_per_step * world_size)))

    @property
    def budgeted(self) -> bool:
        """The sources mix by token budgets (not by weights)."""
        return any(s.budgeted for s in self.sources)


# ---- cross-field checks: on the raw data, so they run beside field errors, each with its key ----


def _set(data: Mapping, key: str) -> bool:
    return data.get(key) is not None


def _source_problems(source: Mapping) -> list[tuple[Loc, str]]:
    problems: list[tuple[Loc, str]] = []
    kinds = [k for k in ("path", "hub", "world") if _set(source, k)]
    if len(kinds) != 1:
        problems.append(
            ((), f"a source needs exactly one of path, hub, world; got {kinds or 'none'}")
        )
    if _set(source, "hub_config") and not _set(source, "hub"):
        problems.append((("hub_config",), "hub_config is only valid with hub"))
    if source.get("document", "line") != "line" and not _set(source, "path"):
        problems.append((("document",), "document is only valid with path (.txt files)"))
    if _set(source, "tokens") and _set(source, "epochs"):
        problems.append((("epochs",), "set tokens or epochs, not both (both are a token budget)"))
    if _set(source, "epochs") and _set(source, "hub"):
        problems.append(
            (
                ("epochs",),
                "epochs needs a count of the source's tokens, which a streamed Hub dataset "
                "cannot give at the start; set tokens (its budget) instead",
            )
        )
    return problems


def cross_field_problems(data: Mapping) -> list[tuple[Loc, str]]:
    """Conflicts between keys of a config (raw data or a model dump), each at the key to fix."""
    problems: list[tuple[Loc, str]] = []
    if _set(data, "init_from") and _set(data, "resume"):
        problems.append(
            (
                ("resume",),
                "init_from and resume are both set: init_from loads weights only, resume restores "
                "a run; drop init_from to resume (the checkpoint holds the model)",
            )
        )
    if _set(data, "init_from") and _set(data, "model"):
        problems.append((("model",), "init_from and model are both set: pick one"))
    if not (_set(data, "init_from") or _set(data, "model") or _set(data, "resume")):
        problems.append(((), "one of init_from, model or resume is required"))
    if _set(data, "max_steps") == _set(data, "max_tokens"):
        where = ("max_tokens",) if _set(data, "max_tokens") else ()
        problems.append((where, "set exactly one of max_steps and max_tokens"))
    if _set(data, "model") and not (_set(data, "tokenizer") or _set(data, "resume")):
        problems.append(
            (("model",), "a model trained from scratch needs tokenizer (e.g. mistral-common)")
        )
    if _set(data, "eval_every") and not data.get("holdout_docs"):
        problems.append((("eval_every",), "eval_every needs holdout_docs > 0 (the held-out split)"))
    if data.get("optimizer") == "adamw_bnb_8bit" and data.get("device") == "cpu":
        problems.append(
            (("optimizer",), "adamw_bnb_8bit (bitsandbytes) runs on CUDA only, and device is cpu")
        )
    if data.get("weights_dtype") == "bfloat16" and data.get("dtype", "bfloat16") != "bfloat16":
        problems.append(
            (
                ("weights_dtype",),
                f"weights_dtype bfloat16 needs dtype bfloat16 (autocast), got {data.get('dtype')}",
            )
        )
    sources = data.get("sources")
    if isinstance(sources, list):
        budgets = []
        for i, source in enumerate(sources):
            if not isinstance(source, Mapping):
                continue
            problems += [(("sources", i, *loc), msg) for loc, msg in _source_problems(source)]
            budgets.append(_set(source, "tokens") or _set(source, "epochs"))
        if any(budgets) and not all(budgets):
            missing = [i for i, b in enumerate(budgets) if not b]
            problems.append(
                (
                    ("sources", missing[0]),
                    "some sources have a token budget (tokens or epochs) and this one has none: "
                    "give every source a budget, or none (then weight mixes them)",
                )
            )
        for i, source in enumerate(sources):
            if any(budgets) and isinstance(source, Mapping) and "weight" in source:
                problems.append(
                    (
                        ("sources", i, "weight"),
                        "weight is unused when the sources mix by token budget (tokens/epochs)",
                    )
                )
    return problems


# ---- resume: what may change between a run and its resumption -----------------------------------

#: Keys that do not change what is computed: how to start, where and how often to log, evaluate
#: and save, and how fast. Every other key alters the training trajectory.
NOT_TRAJECTORY = frozenset(
    {
        "init_from",
        "model",
        "resume",
        "tokenizer",
        "output_dir",
        "device",
        "gradient_checkpointing",
        "attn_implementation",
        "compile",
        "log_every",
        "eval_every",
        "eval_batches",
        "checkpoint_every",
        "keep_last",
        "progress",
        "plot",
    }
)
#: The run's length: may grow when resuming from the final checkpoint of a finished run.
LENGTH_KEYS = ("max_steps", "max_tokens")


def _defaults(model: type[Strict]) -> dict[str, Any]:
    return {
        name: f.get_default(call_default_factory=True)
        for name, f in model.model_fields.items()
        if not f.is_required()
    }


def _flat(config: Mapping) -> dict[str, Any]:
    """``{"lr": 0.01, "sources[0].weight": 3.0, ...}`` with every default filled in."""
    full = {**_defaults(PretrainConfig), **config}
    out: dict[str, Any] = {}
    for key, value in full.items():
        if key in NOT_TRAJECTORY:
            continue
        if key == "sources" and isinstance(value, list):
            for i, source in enumerate(value):
                for k, v in {**_defaults(Source), **source}.items():
                    out[f"sources[{i}].{k}"] = list(v) if isinstance(v, tuple) else v
        else:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def trajectory_changes(stored: Mapping, new: PretrainConfig) -> dict[str, tuple[Any, Any]]:
    """The keys that differ between the stored config of a run and `new`, as
    ``{"lr": (old, new), "sources[1].weight": (1.0, 2.0)}``, leaving out NOT_TRAJECTORY. A key
    the stored config lacks (written by an older version) counts as its default."""
    old, now = _flat(stored), _flat(new.model_dump(mode="json"))
    order = list(PretrainConfig.model_fields)

    def rank(key: str) -> tuple[int, str]:
        head = key.split("[", 1)[0].split(".", 1)[0]
        return (order.index(head) if head in order else len(order), key)

    return {
        key: (old.get(key), now.get(key))
        for key in sorted(set(old) | set(now), key=rank)
        if old.get(key) != now.get(key)
    }


# ---- reading -------------------------------------------------------------------------------------


def parse_config(data: Any, source: str, lines: dict[tuple, int] | None = None) -> PretrainConfig:
    """Validate `data`; all problems, field and cross-field, in one PretrainError naming
    `source`, with the line and key of each."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise PretrainError(
            f"{source}: a pretrain config is a YAML mapping, got {type(data).__name__}",
            "see recipes/pretrain/tiny-cpu.yaml for the shape",
        )
    found: list[tuple[Loc, str]] = []
    config = None
    try:
        config = PretrainConfig.model_validate(data, context={"cross_checked": True})
    except ValidationError as exc:
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            # pydantic puts the model name in loc for after-validators of nested models; drop it
            loc = tuple(p for p in loc if p not in ("Source", "PretrainConfig"))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (misspelt?)"
            found.append((loc, msg))
    found += cross_field_problems(data)
    if not found:
        assert config is not None
        return config
    found.sort(key=lambda p: line_of(p[0], lines) or 0)
    problems = []
    for loc, msg in found:
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(loc, lines) if loc else lines.get(())
        where = f"{source}:{line}" if line else source
        problems.append(f"{where}: {key}: {msg}")
    raise PretrainError(
        f"{len(problems)} problem(s) in {source}: " + " | ".join(problems),
        "fix the keys named above; recipes/pretrain/tiny-cpu.yaml shows every key",
    ) from None


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> PretrainConfig:
    """Read and validate a pretrain config YAML file (plus CLI `overrides`, applied on top)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"config file {path} does not exist", "check the path")
    data, lines, problems = compose_yaml(path.read_text(encoding="utf-8"), str(path))
    if problems:
        first = problems[0]
        what = first.message.removeprefix(INVALID_YAML)
        what = f"{first.path}: {what}" if first.path else what
        raise PretrainError(f"{path}:{first.line}: not valid YAML ({what})", "fix the YAML syntax")
    if isinstance(data, dict) and overrides:
        data = {**data, **overrides}
    return parse_config(data, str(path), lines)
