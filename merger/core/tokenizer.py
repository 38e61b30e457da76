"""The child's tokenizer and its vocabulary tensors, as mergekit 0.1.5 builds them.

Without ``tokenizer_source`` or ``tokenizer:`` the donor's tokenizer files are copied and the
embeddings merge as they are (their rows must then agree). With either, mergekit builds an
output tokenizer and re-indexes every vocabulary tensor (``embed_tokens``, ``lm_head``) of
every input to it before the merge method runs; so do we, with the same steps:

- output tokenizer (`mergekit/tokenizer/build.py`): ``base`` is the base model's tokenizer
  stripped of ids >= its config ``vocab_size``; a model reference is that model's tokenizer;
  ``union`` is the base tokenizer plus every other model's tokens (ordinary tokens first,
  then added tokens, in model order); then each ``tokenizer.tokens`` key not yet in it;
- per model, output id -> input row (-1 where the model lacks the token);
- per vocabulary tensor (`mergekit/tokenizer/embed.py`, ``PermutedVocabulary``): a row the
  model has is copied (unless the token is ``force``d); a missing or forced one is the token's
  default embedding: its ``source`` (a model's row of the token, a ``model_token`` row, or
  ``zero``); for tokens without one, the only model that has it, else the base model's row,
  else the mean over the models that have it; rows padded up to ``pad_to_multiple_of`` are the
  mean of the real rows. All in the promoted dtype of the inputs (after the cast to ``dtype``).

One difference, on purpose: mergekit walks its models in set order
(``MergeConfiguration.referenced_models`` is ``list(set(...))``: the order changes with
``PYTHONHASHSEED``, the model paths and the order they were added), so with three or more
tokenizers the ids of a union's new tokens (and, without a base model, which tokenizer is the
base) can differ from run to run; here the order is the recipe's: the base model first, then
every model in order of appearance. The parity tests run mergekit with that order pinned
(`tests.helpers.mergekit_models_in_recipe_order`). Every case where
mergekit would fail mid-merge (a token source it cannot find, a ``force`` without a source)
is refused here, when the plan is built, before any tensor is read.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kruising.console import console
from kruising.errors import KruisingError
from merger.core.io import ModelSource, resolve_model_path
from merger.core.recipe import MergeRecipe, ModelTokenEmbedding, TokenEmbeddingConfig, ZeroEmbedding

#: Tensors indexed by token id on axis 0 (mergekit's ``vocabulary_axis: 0`` weights).
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_out.weight")

_HINT_SOURCE = "tokenizer_source is base, union or one of the recipe's models"


def is_vocab_tensor(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith(VOCAB_SUFFIXES)


def tokenizer_choice(recipe: MergeRecipe) -> str | None:
    """mergekit's tokenizer source: ``tokenizer.source`` (default union) over ``tokenizer_source``."""
    if recipe.tokenizer is not None:
        return recipe.tokenizer.source
    return recipe.tokenizer_source


# --------------------------------------------------------------------------------------------
# The re-indexing of one vocabulary tensor
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DefaultEmbedding:
    """How mergekit fills a row a model lacks: ``mean`` of rows, one ``row``, or ``zero``."""

    kind: str  # "mean" | "row" | "zero"
    rows: tuple[tuple[int, int], ...] = ()  # (input index, row in that input)


@dataclass
class VocabTask:
    """One vocabulary tensor: every input re-indexed to the output tokenizer before merging."""

    rows: int  # output rows (the tokenizer's size, padded)
    n_vocab: int  # tokens of the output tokenizer
    index: list[torch.Tensor]  # per input: output id -> input row, -1 where the default goes
    defaults: dict[int, DefaultEmbedding] = field(default_factory=dict)  # by output id
    identity: bool = False  # every input is already in the output order: nothing to do

    def apply(
        self, tensors: Sequence[torch.Tensor], in_dtype: torch.dtype | None
    ) -> list[torch.Tensor]:
        """mergekit's ``PermutedVocabulary.execute`` on already loaded (``dtype``-cast) inputs."""
        if in_dtype is not None:
            tensors = [t if t.dtype == in_dtype else t.to(in_dtype) for t in tensors]
        if self.identity:
            return list(tensors)
        dtype = tensors[0].dtype
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        device = tensors[0].device
        shape = tensors[0].shape[1:]
        embeds: dict[int, torch.Tensor] = {}
        for token_id, default in self.defaults.items():
            if default.kind == "mean":  # summed one by one, then divided: mergekit's rounding
                embed = torch.zeros(shape, dtype=dtype, device=device)
                for i, row in default.rows:
                    embed = embed + tensors[i][row]
                embed /= len(default.rows)
            elif default.kind == "row":
                i, row = default.rows[0]
                embed = tensors[i][row]
            else:
                embed = tensors[0].new_zeros(shape)
            embeds[token_id] = embed
        out = []
        for tensor, index in zip(tensors, self.index, strict=True):
            index = index.to(device)
            new = torch.zeros((self.rows, *shape), dtype=dtype, device=device)
            have = index >= 0
            new[: self.n_vocab][have] = tensor[index[have]].to(dtype)
            for token_id, embed in embeds.items():
                if int(index[token_id]) < 0:
                    new[token_id] = embed
            if self.rows > self.n_vocab:  # mergekit pads with the mean of the real rows
                new[self.n_vocab :] = torch.mean(new[: self.n_vocab], dim=0)
            out.append(new)
        return out


# --------------------------------------------------------------------------------------------
# The output tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerPlan:
    """The output tokenizer (saved into the child) and each model's id map to it."""

    choice: str
    tokenizer: Any  # a transformers fast tokenizer
    vocab: dict[str, int]
    rows: int
    permutations: dict[str, dict[int, int]]  # model -> output id -> input id (-1: absent)
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenEmbeddingConfig]
    beyond: dict[str, set[int]]  # model -> output ids whose input id is >= its vocab_size

    def vocab_task(
        self, name: str, refs: Sequence[str], shapes: Sequence[tuple[int, ...]], base: str | None
    ) -> tuple[VocabTask | None, str | None]:
        """The re-indexing of tensor ``name`` over the models ``refs`` (the tensor's inputs,
        in order), or a problem: mergekit's ``assign_embedding_sources`` and
        ``compute_default_embedding``, resolved per token up front."""
        vocab, tokens = self.vocab, self.tokens
        perms = [self.permutations[ref] for ref in refs]
        for ref, shape in zip(refs, shapes, strict=True):
            if len(shape) < 1 or shape[0] == 0:
                return None, f"{name} of {ref} has no vocabulary rows"
        if len({tuple(s[1:]) for s in shapes}) > 1:
            return None, (
                f"shape mismatch in {name}: {refs[0]} has {tuple(shapes[0])}, "
                f"{refs[1]} has {tuple(shapes[1])} (beyond the vocabulary axis)"
            )
        if sorted(vocab.values()) != list(range(len(vocab))):
            return None, f"the output tokenizer's ids are not 0..{len(vocab) - 1}"
        for ref in refs:
            bad = self.beyond.get(ref, set())
            if bad:
                token = next(t for t, i in vocab.items() if i in bad)
                return None, (
                    f"{ref}'s tokenizer puts token {token!r} at an id beyond its vocab_size "
                    f"(mergekit fails on it with a KeyError)"
                )
        for ref, perm, shape in zip(refs, perms, shapes, strict=True):
            top = max((v for v in perm.values() if v >= 0), default=-1)
            if top >= shape[0]:
                return None, f"{ref}'s tokenizer has id {top}, but its {name} has {shape[0]} rows"
        defaults: dict[int, DefaultEmbedding] = {}
        index = [[-1] * len(vocab) for _ in refs]
        identity = all(s[0] == self.rows for s in shapes) and self.rows == len(vocab)
        for token, token_id in vocab.items():
            cfg = tokens.get(token)
            forced = bool(cfg and cfg.force)
            present = [p[token_id] >= 0 for p in perms]
            for i, p in enumerate(perms):
                if present[i] and not forced:
                    index[i][token_id] = p[token_id]
                if p[token_id] != token_id or forced:
                    identity = False
            if not forced and all(present):
                continue
            if cfg is None:  # assign_embedding_sources
                n = sum(present)
                if n == 1:
                    i = present.index(True)
                    defaults[token_id] = DefaultEmbedding("row", ((i, perms[i][token_id]),))
                elif n == 0:
                    console.print(f"[yellow]note:[/] token {token!r} is in no model: zero")
                    defaults[token_id] = DefaultEmbedding("zero")
                elif base in refs and perms[refs.index(base)][token_id] >= 0:
                    i = refs.index(base)
                    defaults[token_id] = DefaultEmbedding("row", ((i, perms[i][token_id]),))
                else:
                    rows = tuple((i, p[token_id]) for i, p in enumerate(perms) if p[token_id] >= 0)
                    defaults[token_id] = DefaultEmbedding("mean", rows)
                continue
            default, problem = self._configured(name, token, token_id, cfg, refs, shapes)
            if problem:
                return None, problem
            defaults[token_id] = default
        index_tensors = [torch.tensor(row, dtype=torch.long) for row in index]
        return VocabTask(self.rows, len(vocab), index_tensors, defaults, identity), None

    def _configured(
        self,
        name: str,
        token: str,
        token_id: int,
        cfg: TokenEmbeddingConfig,
        refs: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
    ) -> tuple[DefaultEmbedding, str | None]:
        where = f"tokenizer.tokens[{token!r}]"
        source = cfg.source
        if isinstance(source, ZeroEmbedding):
            return DefaultEmbedding("zero"), None
        if source is None:
            why = "is forced" if cfg.force else "is missing in some model"
            return DefaultEmbedding("zero"), (
                f"{where}: the token {why} and has no source (mergekit fails on it)"
            )
        model = source.model if isinstance(source, ModelTokenEmbedding) else source
        if model not in refs:
            return DefaultEmbedding("zero"), (
                f"{where}: {model} is not an input of {name} (mergekit fails: that weight is "
                f"missing); inputs: {', '.join(refs)}"
            )
        i = refs.index(model)
        if isinstance(source, ModelTokenEmbedding):
            row = source.token_id
            if row is None:
                vocab = self.original_vocabs.get(model)
                if vocab is None or source.token not in vocab:
                    return DefaultEmbedding("zero"), (
                        f"{where}: token {source.token!r} is not in {model}'s tokenizer"
                    )
                row = vocab[source.token]
            if not 0 <= row < shapes[i][0]:
                return DefaultEmbedding("zero"), (
                    f"{where}: token_id {row} is outside {model}'s {shapes[i][0]} rows of {name}"
                )
            return DefaultEmbedding("row", ((i, row),)), None
        row = self.permutations[model][token_id]
        if row < 0:
            return DefaultEmbedding("zero"), f"{where}: token {token!r} is not in {model}"
        return DefaultEmbedding("row", ((i, row),)), None


def _vocab_size(source: ModelSource | None, fallback: int) -> int:
    config = source.config if source is not None else {}
    size = config.get("vocab_size")
    if size is None and isinstance(config.get("text_config"), Mapping):
        size = config["text_config"].get("vocab_size")
    return int(size) if size is not None else fallback


def _load(path: Path, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def _stripped(path: Path, source: ModelSource, ref: str):
    """mergekit's ``get_stripped_tokenizer``: the tokenizer without ids >= vocab_size."""
    import tokenizers

    tokenizer = _load(path, use_fast=True)
    vocab_size = _vocab_size(source, len(tokenizer.get_vocab()))
    unused = [tok for tok, idx in tokenizer.get_vocab().items() if idx >= vocab_size]
    if not unused:
        return tokenizer
    if not tokenizer.is_fast:
        raise KruisingError(
            f"{ref}'s tokenizer has tokens beyond vocab_size {vocab_size} and no fast version",
            "mergekit cannot merge this tokenizer either; use tokenizer_source: with another model",
        )
    data = json.loads(tokenizer._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise KruisingError(
            f"{ref}'s tokenizer is {data['model']['type']} with tokens beyond vocab_size "
            f"{vocab_size}; mergekit strips only BPE tokenizers",
            "use tokenizer_source: with another model",
        )
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    unused_set = set(unused)
    for tok in unused:
        data["model"]["vocab"].pop(tok, None)

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused_set for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _union(base_tok: Any, loaded: dict[str, Any], sizes: dict[str, int]):
    """mergekit's ``build_union_tokenizer``."""
    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for ref, tok in loaded.items():
        vocab_size = sizes.get(ref) or tok.vocab_size
        added = tok.added_tokens_decoder  # keyed by id: mergekit's `tok in added` never holds
        for token, idx in tok.get_vocab().items():
            if idx >= vocab_size or token in added:
                continue
            out_vocab.setdefault(token, len(out_vocab))
        for idx, info in added.items():
            if idx < vocab_size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # mergekit: save and reload, not mutate
        base_tok.save_pretrained(tmp, legacy_format=False, safe_serialization=True)
        res = _load(Path(tmp), use_fast=True)
    base_vocab = base_tok.get_vocab()
    for token in out_vocab:
        if token not in out_added and token not in base_vocab:
            res.add_tokens(token)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def plan_tokenizer(
    recipe: MergeRecipe, sources: Mapping[str, ModelSource], *, allow_pickle: bool = False
) -> TokenizerPlan | None:
    """Build the output tokenizer and the id maps (None: the donor's tokenizer is copied).

    Raises a `KruisingError` for every tokenizer problem, before any tensor is read.
    """
    choice = tokenizer_choice(recipe)
    if choice is None:
        return None
    refs = list(recipe.referenced_models())
    key = json.dumps(
        [
            recipe.model_dump(mode="json", include={"tokenizer", "tokenizer_source", "base_model"}),
            [(ref, str(sources[ref].path), _stamp(sources[ref].path)) for ref in refs],
        ]
    )
    if key not in _PLANS:  # a sweep plans the same tokenizer for every variant
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = _plan_tokenizer(recipe, sources, choice, refs, allow_pickle)
    return _PLANS[key]


_PLANS: dict[str, TokenizerPlan] = {}


def _plan_tokenizer(
    recipe: MergeRecipe,
    sources: Mapping[str, ModelSource],
    choice: str,
    refs: list[str],
    allow_pickle: bool,
) -> TokenizerPlan:
    base = recipe.base_model or refs[0]
    base_path = sources[base].path
    if not _has_tokenizer(base_path):
        raise KruisingError(
            f"tokenizer_source {choice}: the base model {base} has no tokenizer files",
            "add tokenizer.json (or tokenizer.model) to the base model's folder, or leave "
            "tokenizer_source out to merge without a tokenizer",
        )
    try:
        base_tok = _stripped(base_path, sources[base], base)
    except KruisingError:
        raise
    except Exception as exc:
        raise KruisingError(
            f"cannot load the tokenizer of {base}: {type(exc).__name__}: {exc}",
            "check its tokenizer files (tokenizer.json, tokenizer_config.json)",
        ) from None
    loaded = {base: base_tok}
    for ref in refs:
        if ref == base:
            continue
        try:
            loaded[ref] = _load(sources[ref].path)
        except Exception:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
            console.print(f"[yellow]note:[/] no tokenizer in {ref}: taken to be {base}'s")
    sizes = {ref: _vocab_size(sources.get(ref), 0) for ref in refs}
    if choice == "base":
        out = base_tok
    elif choice == "union":
        out = _union(base_tok, loaded, sizes)
    else:
        if choice in sources:
            path = sources[choice].path
        else:  # mergekit loads a model+lora source's tokenizer from the model
            path = _tokenizer_path(choice.split("+")[0], allow_pickle)
        try:
            out = _load(path)
        except Exception as exc:
            raise KruisingError(
                f"tokenizer_source {choice}: cannot load its tokenizer "
                f"({type(exc).__name__}: {exc})",
                _HINT_SOURCE,
            ) from None
    tokens = dict((recipe.tokenizer.tokens or {}) if recipe.tokenizer else {})
    existing = set(out.get_vocab())
    for token in tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    permutations: dict[str, dict[int, int]] = {}
    beyond: dict[str, set[int]] = {}
    for ref in refs:
        model_vocab = (loaded.get(ref) or loaded[base]).get_vocab()
        size = sizes[ref] or len(model_vocab)
        perm: dict[int, int] = {}
        for token, new_id in vocab.items():
            old = model_vocab.get(token, -1)
            if old >= size:
                beyond.setdefault(ref, set()).add(new_id)
                old = -1
            perm[new_id] = old
        permutations[ref] = perm
    rows = len(vocab)
    multiple = recipe.tokenizer.pad_to_multiple_of if recipe.tokenizer else None
    if multiple and rows % multiple:
        rows = (rows // multiple + 1) * multiple
    return TokenizerPlan(
        choice=choice,
        tokenizer=out,
        vocab=vocab,
        rows=rows,
        permutations=permutations,
        original_vocabs={ref: tok.get_vocab() for ref, tok in loaded.items()},
        tokens=tokens,
        beyond=beyond,
    )


def _stamp(path: Path) -> list[float]:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "config.json")
    return [(path / n).stat().st_mtime if (path / n).is_file() else 0.0 for n in names]


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def _tokenizer_path(ref: str, allow_pickle: bool) -> Path:
    try:
        return resolve_model_path(ref, allow_pickle=allow_pickle)
    except KruisingError as exc:
        raise KruisingError(f"tokenizer_source {ref}: {exc.message}", _HINT_SOURCE) from None


def save_tokenizer(plan: TokenizerPlan, folder: Path, chat_template: str | None) -> None:
    """Save the built tokenizer as mergekit does (``save_pretrained``, chat template set)."""
    tokenizer = plan.tokenizer
    before = tokenizer.chat_template  # the plan is cached: leave it as it was
    if chat_template:
        tokenizer.chat_template = chat_template
    try:
        tokenizer.save_pretrained(str(folder), safe_serialization=True)
    finally:
        tokenizer.chat_template = before
