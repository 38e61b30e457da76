"""The `pretrain run` config: a strict pydantic model read from YAML.

Unknown keys are errors; every problem of a file is reported at once, each with its line.
Relative paths in a config are relative to the current directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from kruising.config import INVALID_YAML, Strict, compose_yaml, line_of
from pretrain.errors import PretrainError


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
    text_field: str = "text"
    messages_field: str | None = Field(
        None, description="a field holding chat messages, rendered with the chat template"
    )
    weight: float = Field(1.0, gt=0, description="mixture weight (relative)")

    @model_validator(mode="after")
    def _one_kind(self) -> Source:
        kinds = [k for k in ("path", "hub", "world") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"a source needs exactly one of path, hub, world; got {kinds or 'none'}"
            )
        if self.hub_config is not None and self.hub is None:
            raise ValueError("hub_config is only valid with hub")
        return self

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path
        if self.hub is not None:
            return self.hub + (f"/{self.hub_config}" if self.hub_config else "")
        return f"world:{self.world}"


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
    document_attention: bool = Field(
        False, description="position ids restart per document, attention stays inside documents"
    )
    holdout_docs: int = Field(0, ge=0, description="first N documents of each source: eval only")
    chat_template: str | None = None

    # optimisation
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, gt=0)
    micro_batch: int = Field(gt=0)
    grad_accum: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)

    # hardware
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
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
    def _consistent(self) -> PretrainConfig:
        problems = []
        if self.init_from and self.resume:
            problems.append(
                "init_from and resume are both set: init_from loads weights only, resume restores "
                "a run; drop init_from to resume (the checkpoint holds the model)"
            )
        if self.init_from and self.model:
            problems.append("init_from and model are both set: pick one")
        if not (self.init_from or self.model or self.resume):
            problems.append("one of init_from, model or resume is required")
        if (self.max_steps is None) == (self.max_tokens is None):
            problems.append("set exactly one of max_steps and max_tokens")
        if self.model and not (self.tokenizer or self.resume):
            problems.append("a model trained from scratch needs tokenizer (e.g. mistral-common)")
        if self.eval_every and self.holdout_docs == 0:
            problems.append("eval_every needs holdout_docs > 0 (the held-out split)")
        if problems:
            raise ValueError("; ".join(problems))
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


def parse_config(data: Any, source: str, lines: dict[tuple, int] | None = None) -> PretrainConfig:
    """Validate `data`; all problems in one PretrainError naming `source`, lines and keys."""
    lines = lines or {}
    if not isinstance(data, dict):
        raise PretrainError(
            f"{source}: a pretrain config is a YAML mapping, got {type(data).__name__}",
            "see recipes/pretrain/tiny-cpu.yaml for the shape",
        )
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            # pydantic puts the model name in loc for after-validators of nested models; drop it
            loc = tuple(p for p in loc if p not in ("Source", "PretrainConfig"))
            key = ".".join(str(p) for p in loc) or "(top level)"
            line = line_of(loc, lines) if loc else None
            where = f"{source}:{line}" if line else source
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key (misspelt?)"
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
