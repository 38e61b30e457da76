"""The runtime options of one merge (`merge run`'s flags), as one frozen object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MergeOptions:
    """How to run a merge; the recipe says what to merge.

    - ``device``: ``auto`` (cuda:0 when there is a GPU), ``cpu``, ``cuda`` or ``cuda:N``;
    - ``out_shard_size``: the largest output shard, e.g. ``5GB``, ``500MB``, ``2GiB``;
    - ``engine``: ``native`` (ours) or ``mergekit`` (the recipe handed to mergekit's API);
    - ``allow_pickle``: accept ``.bin``/``.pt`` checkpoints (``torch.load(weights_only=True)``);
    - ``overwrite``: replace an existing child folder;
    - ``seed``: the seed of the random methods (``dare_*``, ``della*``, ``arcee_fusion``);
    - ``progress``: show a progress bar on stderr;
    - ``lora_merge_cache``: keep each ``model+lora`` input merged in this folder (mergekit's
      ``--lora-merge-cache``); None: the adapter is applied as each tensor is read;
    - ``compute_dtype``: None computes as mergekit does, in the recipe's ``dtype`` (bf16
      arithmetic for a bf16 recipe, rounding where mergekit's torch ops round); ``float32``
      computes every tensor in float32 instead (float64 stays float64) — a recorded choice
      (provenance, model card), as it gives other tensors than mergekit for half recipes;
    - ``lora_merge_dtype``: mergekit's ``--lora-merge-dtype``: a ``model+lora`` input's model
      is cast to this dtype before its adapter is added (and so stored, read and merged in it);
      None: the stored dtype;
    - ``copy_tokenizer``: mergekit's ``--copy-tokenizer``; False: no tokenizer files are copied
      from the donor (a tokenizer the recipe builds is still written, as in mergekit);
    - ``trust_remote_code``, ``allow_crimes``: mergekit's options of those names, for
      ``--engine mergekit`` (the native engine runs no model code and merges one architecture:
      asked for natively they are an error, merger.core.mergekit_engine.check_native);
    - ``mergekit_options``: any other field of mergekit's ``MergeOptions`` as ``(key, value)``
      text pairs (``--mergekit-option KEY=VALUE``), for ``--engine mergekit`` only.
    """

    device: str = "auto"
    out_shard_size: str = "5GB"
    engine: str = "native"
    allow_pickle: bool = False
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    lora_merge_cache: str | None = None
    compute_dtype: str | None = None
    lora_merge_dtype: str | None = None
    copy_tokenizer: bool = True
    trust_remote_code: bool = False
    allow_crimes: bool = False
    mergekit_options: tuple[tuple[str, str], ...] = ()
