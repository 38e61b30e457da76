"""The training entry point: a lean loop on accelerate (one path for CPU, one GPU, FSDP).

Read it top to bottom: load the tokenizer and model, open the corpus, print the plan, then
step: micro-batches → backward → clip → optimizer and scheduler step → log, eval, checkpoint.
`accelerate launch --config_file recipes/pretrain/accelerate-fsdp.yaml -m pretrain.cli run ...`
runs the same function in every process; each process takes its slice of every global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kruising.atomic import replace_folder
from kruising.env import cache_dir
from kruising.hub import offline
from pretrain.config import LENGTH_KEYS, PretrainConfig, trajectory_changes
from pretrain.errors import PretrainError
from pretrain.state import check_checkpoint, restore_scheduler

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


@dataclass
class RunResult:
    model_dir: Path
    steps: int
    tokens: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None
    seconds: float
    mfu: float | None
    main_process: bool = True
    n_params: int = 0
    already_complete: bool = False  # resumed at its last step: nothing was trained


# ---- loading ----------------------------------------------------------------------------------


def _check_hub_model(model_id: str) -> None:
    hint = "download it once with network and pass the local folder, or check the id"
    if offline():
        raise PretrainError(
            f"model {model_id} is not a local folder and HF_HUB_OFFLINE is set", hint
        )
    from huggingface_hub import HfApi

    repo, _, revision = model_id.partition("@")
    try:
        HfApi().model_info(repo, revision=revision or None, timeout=5.0)
    except Exception as exc:
        raise PretrainError(
            f"model {model_id} is not a local folder and the Hub is not reachable "
            f"({type(exc).__name__})",
            hint,
        ) from None


def load_tokenizer(spec: str):
    """'mistral-common' (the bundled Mistral-7B-v0.1 tokenizer), a folder, or a Hub id."""
    if spec == "mistral-common":
        from pretrain.tokenizer import load_mistral_tokenizer

        return load_mistral_tokenizer(cache_dir() / "mistral-tokenizer")  # not a /tmp leak
    from transformers import AutoTokenizer

    if not Path(spec).is_dir():
        _check_hub_model(spec)
    try:
        return AutoTokenizer.from_pretrained(
            spec.partition("@")[0] if not Path(spec).is_dir() else spec
        )
    except Exception as exc:
        raise PretrainError(
            f"cannot load a tokenizer from {spec}: {str(exc).splitlines()[0][:160]}",
            "point tokenizer at a folder with tokenizer files, or use mistral-common",
        ) from None


def _load_model(config: PretrainConfig, resume_dir: Path | None, tokenizer, dtype):
    """The model to train, in `dtype` (the config's weights_dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, MistralConfig

    attn = config.attn_implementation
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise PretrainError(
                "attn_implementation flash_attention_2 needs the flash-attn package",
                "pip install flash-attn, or use sdpa",
            ) from None
    if resume_dir is not None:
        model_config = AutoConfig.from_pretrained(resume_dir / "model")
        model_config._attn_implementation = attn
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    if config.init_from is not None:
        source = config.init_from
        if not Path(source).is_dir():
            _check_hub_model(source)
        try:
            return AutoModelForCausalLM.from_pretrained(
                source.partition("@")[0] if not Path(source).is_dir() else source,
                revision=source.partition("@")[2] or None if not Path(source).is_dir() else None,
                dtype=dtype,
                attn_implementation=attn,
            )
        except (OSError, ValueError) as exc:
            raise PretrainError(
                f"cannot load init_from {source}: {str(exc).splitlines()[0][:160]}",
                "init_from must be a save_pretrained folder (config.json + safetensors) or a Hub id",
            ) from None
    settings = {"vocab_size": len(tokenizer), **(config.model or {})}
    try:
        model_config = MistralConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise PretrainError(f"model: {exc}", "use MistralConfig field names") from None
    model_config._attn_implementation = attn
    torch.manual_seed(config.seed)
    from transformers import MistralForCausalLM

    return MistralForCausalLM(model_config).to(dtype)


def _check_model_fits(config: PretrainConfig, model, tokenizer) -> None:
    vocab = model.config.vocab_size
    if len(tokenizer) > vocab:
        raise PretrainError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}",
            "use the tokenizer that belongs to the checkpoint (tokenizer: ...)",
        )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and config.context_length > max_pos:
        raise PretrainError(
            f"context_length {config.context_length} is longer than the model's "
            f"max_position_embeddings {max_pos}",
            f"set context_length <= {max_pos}",
        )


# ---- checkpoints ------------------------------------------------------------------------------


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temp dirs of a crashed save are ignored)."""
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def _resolve_resume(config: PretrainConfig) -> Path | None:
    if config.resume is None:
        return None
    root = Path(config.output_dir) / "checkpoints"
    if config.resume == "latest":
        found = checkpoints(root)
        if not found:
            raise PretrainError(
                f"resume: latest, but {root} holds no complete checkpoint",
                "run without resume first (with init_from or model), or name a checkpoint folder",
            )
        path = found[-1]
    else:
        path = Path(config.resume)
    state = path / STATE_FILE
    if not (path / "model" / "config.json").is_file() or not state.is_file():
        raise PretrainError(
            f"resume: {path} is not a complete checkpoint (no {STATE_FILE} or model/config.json)",
            "name a step-N folder under <output_dir>/checkpoints, or resume: latest",
        )
    try:
        json.loads(state.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PretrainError(
            f"resume: {state} is corrupt ({exc})", "resume from an older step-N folder"
        ) from None
    return path


def _fmt(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def resume_changes(
    config: PretrainConfig, state: dict[str, Any], world: int, allow: bool
) -> dict[str, list[Any]]:
    """What `config` changes in the run a checkpoint's `state` belongs to, as
    ``{"lr": [old, new]}``; an error naming the keys unless `allow`.

    Every key that alters the training trajectory counts (lr, schedule, batch, context, sources,
    weights, seed, optimizer, dtypes, number of processes ...). Growing max_steps or max_tokens
    is an extension, allowed without `allow` when the checkpoint is the run's final step; the
    schedule then runs over the new total from the checkpoint's step on (documented in README).
    """
    stored = state.get("config")
    if not isinstance(stored, dict):
        return {}  # a checkpoint written before configs were stored: nothing to compare
    changes = {k: list(v) for k, v in trajectory_changes(stored, config).items()}
    step = int(state["step"])
    old_world = int(state.get("world_size", world))
    if old_world != world:
        changes["processes"] = [old_world, world]
    total = config.total_steps(world)
    if total < step:
        raise PretrainError(
            f"resume: the new run length ({total} steps) is shorter than the checkpoint's "
            f"step {step}",
            "set max_steps (or max_tokens) to at least the checkpoint's step",
        )
    old_total = state.get("total_steps")
    finished = old_total is not None and step >= int(old_total)
    extension = {k: changes.pop(k) for k in LENGTH_KEYS if k in changes}
    if extension and not finished:
        changes.update(extension)  # a mid-run change of length reshapes the schedule ahead
        extension = {}
    if changes and not allow:
        listed = ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changes.items())
        raise PretrainError(
            f"resume: the config changes {len(changes)} key(s) that alter the training "
            f"trajectory of the run in {config.output_dir}: {listed}",
            "put the old values back to continue the same run, or pass --allow-config-change "
            "to go on with the new ones (recorded in metrics.jsonl and trainer_state.json)",
        )
    return {**changes, **extension}


def stored_losses(state: dict[str, Any], out: Path) -> tuple[float | None, float | None]:
    """Training and held-out loss at a checkpoint's step: from its trainer_state.json, or, for a
    checkpoint written before it held them, from that step's rows in metrics.jsonl."""
    if "loss" in state:
        return state["loss"], state.get("eval_loss")
    loss = eval_loss = None
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):
                row = json.loads(line)
                if row["step"] == state["step"]:
                    loss = row.get("loss", loss)
                    eval_loss = row.get("eval_loss", eval_loss)
    return loss, eval_loss


def _model_is_current(out: Path, checkpoint: Path) -> bool:
    """out/model holds the weights of `checkpoint`: written (by the run's end) after it, and
    `checkpoint` is the run's newest, so no later training can have replaced it."""
    model_dir, found = out / "model", checkpoints(out / "checkpoints")
    weights = list(model_dir.glob("*.safetensors"))
    if not (model_dir / "config.json").is_file() or not weights or not found:
        return False
    if found[-1].resolve() != checkpoint.resolve():
        return False
    written = min(f.stat().st_mtime for f in [model_dir / "config.json", *weights])
    return written >= (checkpoint / STATE_FILE).stat().st_mtime


def _complete_message(
    config: PretrainConfig,
    checkpoint: Path,
    state: dict[str, Any],
    losses: tuple[float | None, float | None],
    rewrite: bool,
) -> str:
    """A resume of a run at its last step: what it holds and how to go on."""
    loss, eval_loss = losses
    figures = [f"{int(state['tokens_seen']):,} tokens"]
    figures.append(f"final loss {loss:.4f}" if loss is not None else "final loss not recorded")
    if eval_loss is not None:
        figures.append(f"eval loss {eval_loss:.4f}")
    changes = [
        k for k in trajectory_changes(state.get("config") or {}, config) if k not in LENGTH_KEYS
    ]
    return (
        f"resume: the run in {config.output_dir} is already complete: {checkpoint.name} is its "
        f"final step, {state['step']} of {state['total_steps']} ({', '.join(figures)}); "
        "nothing to train"
        + (f", writing {Path(config.output_dir) / 'model'} from it" if rewrite else "")
        + ". To train further, raise max_steps (or max_tokens) and resume again: the run goes on "
        "from this checkpoint"
        + (
            f" (the config also changes {', '.join(changes)}: that needs --allow-config-change)"
            if changes and state.get("config")
            else ""
        )
        + "."
    )


# ---- schedule, flops --------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def flops_per_token(model_config, n_params: int, context: int) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 N + 12 L H Q T, N without embeddings."""
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    embed = model_config.vocab_size * hidden
    n = n_params - embed  # the input embedding does no matmul; the lm head does
    return 6 * n + 12 * layers * hidden * context


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    """Dense bf16 peak of the GPU (env KRUISING_PEAK_FLOPS overrides), None when unknown/CPU."""
    if os.environ.get("KRUISING_PEAK_FLOPS"):
        return float(os.environ["KRUISING_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


# ---- the run ----------------------------------------------------------------------------------


def _accelerator(config: PretrainConfig):
    import torch
    from accelerate import Accelerator

    if config.device == "cuda" and not torch.cuda.is_available():
        raise PretrainError("device: cuda, but no CUDA GPU is visible", "use device: auto or cpu")
    on_cpu = config.device == "cpu" or not torch.cuda.is_available()
    mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[config.dtype]
    if on_cpu and mixed == "fp16":
        raise PretrainError("dtype float16 needs a GPU", "use float32 or bfloat16 on a CPU")
    if config.optimizer == "adamw_bnb_8bit":
        if on_cpu:
            raise PretrainError(
                "optimizer adamw_bnb_8bit (bitsandbytes' 8-bit AdamW) needs a CUDA GPU, and "
                "this run is on the CPU",
                "use optimizer: adamw on a CPU",
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise PretrainError(
                "optimizer adamw_bnb_8bit needs the bitsandbytes package, which is not installed",
                "pip install bitsandbytes, or use optimizer: adamw",
            ) from None
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=mixed)
    if on_cpu and accelerator.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """FSDP2 over gloo on CPU processes, as the FSDP config asks: accelerate would run DDP
    (MULTI_CPU) there and ignore it. The model is then prepared, stepped and checkpointed on
    the same fully_shard path as on GPUs (what tests/pretrain/test_fsdp.py runs)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # FSDP_* env
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.fsdp_plugin = plugin
    # both shared states: every AcceleratorState() copies the process state's type again
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP


def _optimizer(config: PretrainConfig, model, fused: bool):
    """AdamW (torch) or 8-bit AdamW (bitsandbytes, as GEITje); no weight decay on 1-d params."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    settings = {"lr": config.lr, "betas": config.betas, "eps": config.eps}
    if config.optimizer == "adamw_bnb_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **settings)
    return torch.optim.AdamW(groups, **settings, fused=fused)


def _apply_hyperparameters(optimizer, scheduler, config: PretrainConfig) -> None:
    """After a resume: the config's lr, betas, eps and weight decay, not the checkpoint's
    (torch restores param groups from the optimizer state). Equal values when nothing changed."""
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for k, group in enumerate(optimizer.param_groups):
        group["betas"], group["eps"] = config.betas, config.eps
        group["weight_decay"] = config.weight_decay if k == 0 else 0.0
        group["lr"] = config.lr * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _labels(ids, config: PretrainConfig, eos: int | None):
    """Targets: the input ids, with EOS masked out (-100) unless loss_on_eos."""
    if config.loss_on_eos or eos is None:
        return ids
    return ids.masked_fill(ids == eos, -100)


def run(
    config: PretrainConfig, *, chat_template: str | None = None, allow_config_change: bool = False
) -> RunResult:
    """Train as `config` says; returns where the final model went and the measured numbers.

    Resuming with a config that changes the training trajectory is an error naming the keys,
    unless `allow_config_change` (then the changes are recorded in metrics and trainer state).
    """
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # our own progress is enough
    from kruising.console import console

    out = Path(config.output_dir)
    resume_dir = _resolve_resume(config)
    accelerator = _accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    show = config.progress and main
    history: list[dict[str, Any]] = []
    changed: dict[str, list[Any]] = {}
    complete = False  # resumed at the run's last step: nothing to train
    if resume_dir is not None:
        stored_state = json.loads((resume_dir / STATE_FILE).read_text())
        done, total = int(stored_state["step"]), config.total_steps(world)
        if done == stored_state.get("total_steps") == total:
            # the run as configured is done: nothing trains, so there is nothing to compare
            rewrite = not _model_is_current(out, resume_dir)
            losses = stored_losses(stored_state, out)
            if main:
                console.print(_complete_message(config, resume_dir, stored_state, losses, rewrite))
            if not rewrite:  # exit 0: the run asked for exists (README, "Resume and extension")
                tokens = int(stored_state["tokens_seen"])
                return RunResult(
                    out / "model", done, tokens, *losses, None, 0.0, None, main,
                    already_complete=True,
                )  # fmt: skip
        else:
            changed = resume_changes(config, stored_state, world, allow_config_change)
        history = list(stored_state.get("config_changes", []))
        if changed:
            history.append({"step": int(stored_state["step"]), "changes": changed})

    # tokenizer and model
    tok_spec = config.tokenizer or (str(resume_dir / "model") if resume_dir else config.init_from)
    assert tok_spec is not None
    tokenizer = load_tokenizer(tok_spec)
    template = chat_template or config.chat_template
    if template:
        tokenizer.chat_template = template

    # data: every source opened and non-empty before the model loads (minutes for a 7B)
    from pretrain.data import StreamState, build_stream, eval_blocks

    render = _chat_renderer(tokenizer) if tokenizer.chat_template else None
    stream, factories = build_stream(config, tokenizer, render)
    stream.check()

    weights_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.weights_dtype]
    model = _load_model(config, resume_dir, tokenizer, weights_dtype)
    _check_model_fits(config, model, tokenizer)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False

    # optimizer and schedule (fused AdamW on one GPU / DDP; FSDP swaps parameters in prepare)
    from accelerate.utils import DistributedType

    fused = accelerator.device.type == "cuda" and accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_GPU,
    )
    if fused or config.optimizer == "adamw_bnb_8bit":
        model.to(accelerator.device)
    optimizer = _optimizer(config, model, fused)
    total = config.total_steps(world)
    warmup = int(config.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, config.schedule, config.min_lr_ratio)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # forward through the compiled module; save, sync and clip through the plain one
    forward = torch.compile(model) if config.compile else model
    # the scheduler is not registered for checkpointing: accelerate would pickle it and load
    # it back with weights_only=False; it is restored from the step (pretrain.state)

    step, tokens_seen = 0, 0
    if resume_dir is not None:
        check_checkpoint(resume_dir, rank)
        try:
            accelerator.load_state(str(resume_dir))
        except Exception as exc:
            raise PretrainError(
                f"resume: cannot load checkpoint {resume_dir} ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''})",
                "the checkpoint is damaged; resume from an older step-N folder",
            ) from None
        state = json.loads((resume_dir / STATE_FILE).read_text())
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        restore_scheduler(scheduler, step)
        stream.load_state(StreamState.from_json(state["data"]))
        _apply_hyperparameters(optimizer, scheduler, config)
        complete = step >= total

    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    model_config = accelerator.unwrap_model(model).config
    fpt = flops_per_token(model_config, n_params, config.context_length)
    peak = peak_flops(accelerator.device)
    tokens_per_step = config.tokens_per_step * world
    if show:
        start = (
            f"resume from {resume_dir} (step {step})"
            if resume_dir
            else (f"init_from {config.init_from}" if config.init_from else "from scratch")
        )
        console.print(
            f"pretrain: {n_params / 1e6:.1f}M params, {start}; {len(config.sources)} source(s); "
            f"context {config.context_length}, {config.micro_batch}x{config.grad_accum}x{world} seqs/step "
            f"= {tokens_per_step:,} tokens/step, {total} steps = {total * tokens_per_step:,} tokens; "
            f"device {accelerator.device}, {world} process(es) ({accelerator.distributed_type.value}), "
            f"{config.dtype}"
            + (f" (weights {config.weights_dtype})" if config.weights_dtype != "float32" else "")
            + f", {config.optimizer}, {config.attn_implementation}"
        )
        if changed:
            console.print(
                "resume: continuing with changed "
                + ", ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in changed.items())
            )

    held_out = None
    eval_loss: float | None = None
    if config.eval_every:
        held_out = eval_blocks(
            factories,
            tokenizer,
            config.context_length,
            config.holdout_docs,
            config.add_bos,
            config.document_attention,
            config.eval_batches * config.micro_batch,
        )

    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out, step if resume_dir else 0, main)
    if changed:
        metrics.write({"step": step, "tokens": tokens_seen, "config_change": changed})
    eos = tokenizer.eos_token_id
    if held_out is not None and resume_dir is None:  # the held-out curve's starting point
        eval_loss = _evaluate(model, held_out, config, rank, world, accelerator, eos)
        metrics.write({"step": 0, "tokens": 0, "eval_loss": round(eval_loss, 6)})
    blocks = stream.blocks()
    loss_value = float("nan")
    t_start = time.perf_counter()
    tokens_at_start = tokens_seen
    paused = 0.0  # seconds of eval and checkpoints: not training throughput
    train_seconds = 0.0  # wall time minus `paused`, up to the last logged step
    progress = _progress(show, console, total, step)

    def batch_tensors():
        rows = [next(blocks) for _ in range(config.micro_batch * world)]
        mine = rows[rank::world]
        ids = torch.tensor([r[0] for r in mine])
        pos = torch.tensor([r[1] for r in mine])
        if accelerator.device.type == "cuda":  # pinned + async: the host packs the next batch
            return (  # while the GPU still runs this one
                ids.pin_memory().to(accelerator.device, non_blocking=True),
                pos.pin_memory().to(accelerator.device, non_blocking=True),
            )
        return ids.to(accelerator.device), pos.to(accelerator.device)

    # on a CPU each step reuses the blocks the last one freed (kruising.malloc)
    from kruising.malloc import kept_freed_memory

    kept = kept_freed_memory() if accelerator.device.type == "cpu" else contextlib.nullcontext()
    with progress, kept:
        task = (
            progress.add_task("pretrain", total=total, completed=step, loss="-", lr="-", tps="-")
            if show
            else None
        )
        t_log = time.perf_counter()
        tokens_log = tokens_seen
        pending: list[tuple[int, Any, float, int]] = []
        while step < total:
            model.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            for k in range(config.grad_accum):
                ids, pos = batch_tensors()
                sync = (
                    contextlib.nullcontext()
                    if k == config.grad_accum - 1
                    else accelerator.no_sync(model)
                )
                with sync:
                    loss = forward(
                        input_ids=ids,
                        position_ids=pos,
                        labels=_labels(ids, config, eos),
                        use_cache=False,
                    ).loss
                    accelerator.backward(loss / config.grad_accum)
                loss_sum += loss.detach()
            if config.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            # losses stay on the device until a log step: one sync per window, not per step
            pending.append(
                (step, loss_sum / config.grad_accum, scheduler.get_last_lr()[0], tokens_seen)
            )
            evaluate = held_out is not None and (step % config.eval_every == 0 or step == total)  # type: ignore[operator]
            ckpt = bool(config.checkpoint_every) and (
                step % config.checkpoint_every == 0 or step == total  # type: ignore[operator]
            )  # the final step too: a finished run can be extended from its end
            if not (step % config.log_every == 0 or step == total or evaluate or ckpt):
                continue
            losses = accelerator.reduce(
                torch.stack([p[1] for p in pending]), reduction="mean"
            ).tolist()
            bad = [(p[0], v) for p, v in zip(pending, losses, strict=True) if not math.isfinite(v)]
            if bad:
                raise PretrainError(
                    f"loss became {bad[0][1]} at step {bad[0][0]}; nothing after the last "
                    "checkpoint was kept",
                    "lower lr, raise warmup_fraction, or use bfloat16 instead of float16",
                )
            rows: list[dict[str, Any]] = [
                {"step": st, "loss": round(v, 6), "lr": lr, "tokens": tk}
                for (st, _, lr, tk), v in zip(pending, losses, strict=True)
            ]
            pending.clear()
            loss_value = losses[-1]
            now = time.perf_counter()
            train_seconds = now - t_start - paused
            tps = (tokens_seen - tokens_log) / max(now - t_log, 1e-9)
            t_log, tokens_log = now, tokens_seen
            rows[-1]["tokens_per_s"] = round(tps, 1)
            if peak:
                rows[-1]["mfu"] = round(tps * fpt / (peak * world), 4)
            if evaluate:
                eval_loss = _evaluate(model, held_out, config, rank, world, accelerator, eos)
                rows[-1]["eval_loss"] = round(eval_loss, 6)
                t_log = time.perf_counter()  # eval time is not training throughput
                paused += t_log - now
            for row in rows:
                metrics.write(row)
            if show:  # the bar shows the run's training tokens/s so far: the summary's figure
                trained = (tokens_seen - tokens_at_start) / max(train_seconds, 1e-9)
                progress.update(
                    task,
                    completed=step,
                    loss=f"{loss_value:.3f}",
                    lr=f"{rows[-1]['lr']:.2e}",
                    tps=f"{trained:,.0f}",
                )
            if ckpt:
                saving = time.perf_counter()
                _save_checkpoint(
                    accelerator,
                    model,
                    tokenizer,
                    out,
                    {
                        "step": step,
                        "tokens_seen": tokens_seen,
                        "total_steps": total,
                        "world_size": world,
                        "data": stream.state.to_json(),
                        "config": config.model_dump(mode="json"),
                        "config_changes": history,
                        "loss": round(loss_value, 6),  # what a resume of a finished run reports
                        **({"eval_loss": round(eval_loss, 6)} if evaluate else {}),  # type: ignore[arg-type]
                    },
                    config.keep_last,
                )
                t_log = time.perf_counter()
                paused += t_log - saving

    seconds = time.perf_counter() - t_start
    # training throughput: eval and checkpoint time left out (the bar showed the same measure)
    tps: float | None = (tokens_seen - tokens_at_start) / max(train_seconds, 1e-9)
    mfu = tps * fpt / (peak * world) if peak else None
    final_loss: float | None = loss_value
    if complete:  # nothing trained: the checkpoint's figures, not NaN
        final_loss, eval_loss = stored_losses(state, out)
        tps = mfu = None
    model_dir = out / "model"
    _save_final(accelerator, model, tokenizer, model_dir)
    metrics.close()
    if main and config.plot:
        plot_loss(out / "metrics.jsonl", out / "loss.png")
    if show and not complete:
        console.print(
            f"done: {step} steps, {tokens_seen:,} tokens, final loss {loss_value:.4f}"
            + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "")
            + f", {tps:,.0f} tokens/s training"
            + (
                f" ({(tokens_seen - tokens_at_start) / max(seconds, 1e-9):,.0f} tokens/s over "
                f"all {seconds:.0f} s, of which {paused:.0f} s eval and checkpoints)"
                if paused >= 0.5
                else ""
            )
            + (f", MFU {mfu:.1%}" if mfu else "")
            + f"; model in {model_dir}"
        )
    return RunResult(
        model_dir, step, tokens_seen, final_loss, eval_loss, tps, seconds, mfu, main, n_params,
        already_complete=complete,
    )  # fmt: skip


def _chat_renderer(tokenizer):
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""

    def render(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        # tokenize_document adds BOS and EOS itself
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        if eos and text.endswith(eos):
            text = text[: -len(eos)]
        return text

    return render


def _evaluate(model, blocks, config, rank, world, accelerator, eos) -> float:
    """Mean loss over the held-out blocks (the training loss's definition, EOS included unless
    loss_on_eos is false)."""
    import torch

    micro_batch = config.micro_batch
    model.eval()
    losses = []
    mine = blocks[rank::world] or blocks[:1]
    with torch.no_grad():
        for i in range(0, len(mine), micro_batch):
            chunk = mine[i : i + micro_batch]
            ids = torch.tensor([b[0] for b in chunk], device=accelerator.device)
            pos = torch.tensor([b[1] for b in chunk], device=accelerator.device)
            labels = _labels(ids, config, eos)
            losses.append(
                model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss.detach()
            )
    mean = torch.stack(losses).mean()
    return accelerator.reduce(mean, reduction="mean").item()


def _save_checkpoint(
    accelerator, model, tokenizer, out: Path, state: dict[str, Any], keep_last: int
) -> None:
    """Write step-N (`state` is its trainer_state.json) into a temp folder, rename when
    complete; keep the last `keep_last`."""
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['step']:08d}"
    tmp = root / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.config.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        (tmp / STATE_FILE).write_text(json.dumps(state))
        replace_folder(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _save_final(accelerator, model, tokenizer, model_dir: Path) -> None:
    state_dict = accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = model_dir.with_name(f".{model_dir.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        replace_folder(tmp, model_dir)
    accelerator.wait_for_everyone()


class _Metrics:
    """metrics.jsonl (rows after a resumed step are dropped first) and TensorBoard when installed."""

    def __init__(self, out: Path, start_step: int, main: bool) -> None:
        self.main = main
        self.path = out / "metrics.jsonl"
        self.tb = None
        if not main:
            return
        kept = []
        if start_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step":
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.main:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def _progress(show: bool, console, total: int, step: int):
    if not show:
        return contextlib.nullcontext()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def plot_loss(metrics: Path, png: Path) -> None:
    """Training (and eval) loss against tokens seen, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in every if "loss" in r]  # not the step-0 eval or a config-change note
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in every if "eval_loss" in r]
    if ev:
        ax.plot([r["tokens"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
