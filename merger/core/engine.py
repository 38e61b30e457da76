"""`merge run`: load, plan, stream, write.

1. load   — parse the recipe, open every input (local folder or Hub id) from shard headers.
2. plan   — resolve every tensor's inputs and parameters (merger.core.plan); all errors up front.
3. stream — a reader thread maps the next tensors (and moves them onto the GPU on a copy
            stream when there is one) while the device merges, in mergekit's compute dtype
            (the recipe's `dtype`) or in float32 with --compute-dtype float32; on the CPU,
            several tensors at once, each by a fused kernel (merger.core.kernels) segment by
            segment into the output shards laid out up front from the plan (merger.core.io).
4. write  — config, generation config, tokenizer, model card, recipe, provenance; the
            child is built in a temporary sibling folder and renamed into place when complete.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from kruising.console import console
from kruising.device import resolve_device
from kruising.errors import KruisingError
from merger.core import output
from merger.core.child import check_chat_template, write_provenance
from merger.core.io import (
    ModelSource,
    Output,
    ShardWriter,
    open_model,
    parse_size,
    write_tensor,
)
from merger.core.kernels import FLOAT32_INSIDE, FUSED_METHODS, fused_merge
from merger.core.kernels import available as kernels_available
from merger.core.kernels import why_not as kernels_why_not
from merger.core.methods import MergeInputError, TieCount, count_ties
from merger.core.options import MergeOptions
from merger.core.plan import MergePlan, TensorTask, build_plan
from merger.core.recipe import MergeRecipe, load_recipe


def open_sources(
    recipe: MergeRecipe,
    *,
    allow_pickle: bool = False,
    lora_cache: str | None = None,
    lora_dtype: str | None = None,
) -> dict[str, ModelSource]:
    """Every model the recipe names, base first, opened from its shard headers; a
    ``model+lora`` input with its adapter applied (merger.core.adapter), its model cast to
    ``lora_dtype`` first when given (mergekit's ``--lora-merge-dtype``)."""
    from merger.core.adapter import open_lora_input

    sources = {}
    for ref in recipe.referenced_models():
        if "+" in ref:
            cache = Path(lora_cache) if lora_cache else None
            sources[ref] = open_lora_input(
                ref, allow_pickle=allow_pickle, cache=cache, dtype=lora_dtype
            )
        else:
            sources[ref] = open_model(ref, allow_pickle=allow_pickle)
    return sources


def _seed_for(seed: int, task: TensorTask) -> int:
    return (seed * 1_000_003 + zlib.crc32(task.name.encode())) % (2**63)


def compute_task(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    seed: int = 0,
    out: Output | None = None,
    ties: TieCount | None = None,
) -> torch.Tensor | None:
    """Merge one tensor on the device its inputs are on (``ties`` counts TIES's tie rule).

    Without ``out`` the result is returned, in the output dtype. With ``out`` (the tensor's
    place in the output shards, `ShardWriter.output`) it is written there span by span — by a
    fused CPU kernel as it computes, or copied from the reference method's result — and None
    is returned; the caller commits ``out``.
    """
    if task.vocab is not None:  # mergekit: loaded in `dtype`, then re-indexed to the tokenizer
        tensors = task.vocab.apply(tensors, task.in_dtype)
    compute = task.compute_dtype or torch.float32  # mergekit's, or float32 when asked
    load = task.in_dtype
    if (
        load is not None
        and (load != compute or plan.method.name in FLOAT32_INSIDE)
        and any(torch.promote_types(t.dtype, load) != load for t in tensors)
    ):
        # mergekit loads the inputs in `dtype`: where that rounds them and the method computes
        # in another dtype (--compute-dtype float32; linear and slerp, float32 inside), round
        # them first (else casting to the compute dtype, in the kernels or below, is that)
        tensors = [t.to(load) for t in tensors]
    generator = None
    if plan.method.random:
        generator = torch.Generator(device=tensors[0].device)
        generator.manual_seed(_seed_for(seed, task))
    # the kernels read the inputs as stored and round to `compute` themselves
    with count_ties(ties):
        fused = fused_merge(
            plan.method.name,
            tensors,
            task.base_index,
            task.params,
            task.per_model,
            task.out_dtype,
            out,
            generator,
            compute,
        )
    if fused is None:
        tensors = [t if t.dtype == compute else t.to(compute) for t in tensors]
    if fused is not None:
        merged, bad = fused  # the kernel counted NaN/Inf on its way out
    else:
        try:
            with count_ties(ties):
                merged = plan.method(
                    tensors,
                    task.base_index,
                    task.params,
                    task.per_model,
                    generator,
                    task.out_dtype,
                )
        except MergeInputError as exc:
            message = f"{plan.method.name} cannot merge {task.name}: {exc}"
            raise KruisingError(message, exc.hint) from None
        # a sum is finite when no element is NaN/Inf (no copy, unlike a float64 sum); only
        # when it is not, count exactly (a huge but finite sum can overflow on its own)
        bad = 0 if bool(torch.isfinite(merged.sum())) else int((~torch.isfinite(merged)).sum())
    if bad:
        raise KruisingError(
            f"merged tensor {task.name} has {bad} NaN/Inf values",
            "check the inputs for NaN/Inf and the parameters (e.g. weights that sum to ~0 "
            "with normalize, or a huge lambda)",
        )
    if merged is None:
        return None  # the kernel wrote it to `out`
    merged = merged.to(task.out_dtype)
    if out is not None:
        write_tensor(out, merged)
        return None
    return merged


_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _reader(plan: MergePlan, device: torch.device, out: queue.Queue, stop: threading.Event) -> None:
    """Fetch each task's inputs ahead of the compute loop."""
    try:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        for task in plan.tasks:
            if stop.is_set():
                return
            tensors = [plan.sources[ref].read(name) for ref, name in task.inputs]
            event = None
            if stream is not None:
                with torch.cuda.stream(stream):
                    tensors = [t.pin_memory().to(device, non_blocking=True) for t in tensors]
                    event = torch.cuda.Event()
                    event.record(stream)
            else:
                for ref, name in task.inputs:
                    plan.sources[ref].prefetch(name)
            out.put((task, tensors, event))
        out.put(_DONE)
    except BaseException as exc:  # handed to the main thread
        out.put(_Failure(exc))


def cpu_workers() -> int:
    """Tensors merged at once on the CPU: one per core, at most 4 (each holds its inputs)."""
    return max(1, min(4, os.cpu_count() or 1))


def stream_merge(
    plan: MergePlan,
    device: torch.device,
    *,
    writer: ShardWriter | None = None,
    seed: int = 0,
    progress: bool = True,
    ties: TieCount | None = None,
) -> None:
    """Run every task of the plan, overlapping reads, compute and writes.

    On the CPU, `cpu_workers()` tensors are merged at once, each on one thread: the kernels
    work in cache-sized chunks, where an OpenMP region per chunk costs more than the chunk
    itself, so parallelism comes from merging different tensors side by side instead.
    """
    workers = cpu_workers() if device.type == "cpu" else 1
    # on the CPU one task read ahead (and one being read): with the workers never idle behind
    # the oldest tensor, a deeper queue only maps more input pages at once (peak RSS)
    inbox: queue.Queue = queue.Queue(maxsize=1 if device.type == "cpu" else workers + 1)
    stop = threading.Event()
    reader = threading.Thread(target=_reader, args=(plan, device, inbox, stop), daemon=True)
    reader.start()
    bar = _progress(progress)
    n_tasks = len(plan.tasks)
    threads = torch.get_num_threads()
    on_cpu = device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(1)

    def merge_one(task: TensorTask, tensors: list[torch.Tensor]) -> None:
        out = writer.output(task.name) if writer is not None and on_cpu else None
        try:  # on the CPU straight into its place in the shards, span by span
            merged = compute_task(plan, task, tensors, seed, out, ties)
        except BaseException:
            if out is not None:
                out.release()
            raise
        for ref, name in task.inputs:
            plan.sources[ref].release(name)
        if out is not None:
            out.commit()
        elif writer is not None:
            writer.write(task.name, merged)  # computed on the GPU: copied into its shard

    pending: dict[Future, TensorTask] = {}  # in flight, at most `workers`
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge")
    try:
        with bar:
            job = bar.add_task(f"merging 0/{n_tasks} tensors", total=plan.write_bytes)
            done = 0

            def finish_one() -> None:
                """Wait for whichever tensor finishes first (not the oldest: a worker done
                with a small tensor takes the next one while a large one is still merging)."""
                nonlocal done
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    task = pending.pop(future)
                    future.result()
                    done += 1
                    bar.update(
                        job, advance=task.nbytes, description=f"merging {done}/{n_tasks} tensors"
                    )

            while True:
                item = inbox.get()
                if item is _DONE:
                    break
                if isinstance(item, _Failure):
                    raise item.exc
                task, tensors, event = item
                if event is not None:
                    compute_stream = torch.cuda.current_stream(device)
                    compute_stream.wait_event(event)
                    for t in tensors:  # allocated on the copy stream, freed after compute
                        t.record_stream(compute_stream)
                pending[pool.submit(merge_one, task, tensors)] = task
                del tensors
                if len(pending) >= workers:
                    finish_one()
            while pending:
                finish_one()
    finally:
        stop.set()
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(threads)
        while reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                inbox.get(timeout=0.05)
            except queue.Empty:
                pass


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def _describe(plan: MergePlan, device: torch.device) -> str:
    out_dtypes = sorted({str(t.out_dtype).removeprefix("torch.") for t in plan.tasks})
    computes = sorted({str(t.compute_dtype).removeprefix("torch.") for t in plan.tasks})
    return (
        f"{plan.method.name}: {len(plan.sources)} models, {len(plan.tasks)} tensors, "
        f"{plan.num_layers} layers, {_gb(plan.read_bytes)} to read, {_gb(plan.write_bytes)} "
        f"to write, device {device}{_kernel_note(plan, device)}, compute {'/'.join(computes)}, "
        f"out {'/'.join(out_dtypes)}"
    )


def _kernel_note(plan: MergePlan, device: torch.device) -> str:
    if device.type != "cpu" or plan.method.name not in FUSED_METHODS:
        return ""
    if kernels_available():
        return " (fused kernels)"
    return f" (torch kernels: {kernels_why_not()})"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


#: the methods whose trim keeps threshold ties by index (counted into the provenance)
TIE_RULE_METHODS = ("ties",)


def compute_override(options: MergeOptions) -> torch.dtype | None:
    """``--compute-dtype``: None (mergekit's: the recipe's dtype) or float32."""
    choice = options.compute_dtype
    if choice in (None, "mergekit"):
        return None
    if choice == "float32":
        return torch.float32
    raise KruisingError(
        f"--compute-dtype {choice!r} is not a choice",
        "use --compute-dtype float32, or leave it out (the recipe's dtype, as mergekit)",
    )


def compute_record(plan: MergePlan, override: torch.dtype | None) -> dict[str, Any]:
    """The provenance's (and the card's) word on the dtype the tensors were computed in."""
    return {
        "choice": "float32" if override is not None else "mergekit",
        "dtypes": sorted({str(t.compute_dtype).removeprefix("torch.") for t in plan.tasks}),
        "flag": "--compute-dtype float32" if override is not None else None,
    }


def run_recipe_file(
    recipe_path: Path,
    out: Path,
    options: MergeOptions | None = None,
    *,
    intermediate_dir: Path | None = None,
) -> Path:
    """`merge run RECIPE --out DIR`: merge the recipe file into a child folder; a file of
    several documents (mergekit-multimerge) stage by stage (merger.core.multidoc)."""
    from merger.core.multidoc import is_multi_document, run_stages

    options = options or MergeOptions()
    recipe_path = Path(recipe_path)
    try:
        text = recipe_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None  # load_recipe says what is wrong
    if options.engine == "mergekit" and text is not None:
        _check_engine_options(options)
        from merger.core import mergekit_engine

        if is_multi_document(text):
            return mergekit_engine.run_stages_with_mergekit(
                text, str(recipe_path), Path(out), options, intermediate_dir
            )
        return mergekit_engine.run_with_mergekit(text, str(recipe_path), Path(out), options)
    if text is not None and is_multi_document(text):
        _check_engine_options(options)
        return run_stages(text, str(recipe_path), out, options, intermediate_dir)
    recipe = load_recipe(recipe_path)
    return run_recipe(recipe, out, options, recipe_text=recipe_path.read_text())


def _check_engine_options(options: MergeOptions) -> None:
    """The engine's name, and the options the native engine cannot honour (an error)."""
    from merger.core.mergekit_engine import check_lora_dtype, check_native

    if options.engine not in ("native", "mergekit"):
        raise KruisingError(f"unknown engine {options.engine!r}", "use --engine native or mergekit")
    check_lora_dtype(options.lora_merge_dtype)
    if options.engine == "native":
        check_native(options)
    elif compute_override(options) is not None:
        raise KruisingError(
            "--compute-dtype float32 is a native-engine choice: mergekit computes in the "
            "recipe's dtype",
            "drop --compute-dtype, or run with --engine native",
        )


def run_recipe(
    recipe: MergeRecipe,
    out: Path,
    options: MergeOptions | None = None,
    *,
    recipe_text: str | None = None,
) -> Path:
    """Merge ``recipe`` into the child folder ``out``; returns the folder.

    ``recipe_text`` is the recipe as the user wrote it (kept in the child); by default the
    recipe written back as YAML.
    """
    from merger.core.recipe import recipe_to_yaml

    options = options or MergeOptions()
    recipe_text = recipe_text if recipe_text is not None else recipe_to_yaml(recipe)
    _check_engine_options(options)
    if options.engine == "mergekit":
        from merger.core.mergekit_engine import run_with_mergekit

        return run_with_mergekit(recipe_text, "<recipe>", Path(out), options)
    compute = compute_override(options)
    torch_device = resolve_device(options.device)
    max_shard = parse_size(options.out_shard_size)
    sources = open_sources(
        recipe,
        allow_pickle=options.allow_pickle,
        lora_cache=options.lora_merge_cache,
        lora_dtype=options.lora_merge_dtype,
    )
    plan = build_plan(recipe, sources, compute)
    check_chat_template(recipe.chat_template)
    out = Path(out)
    inputs = [source.path for source in sources.values()]
    output.check_not_an_input(out, inputs)
    console.print(_describe(plan, torch_device))
    tmp = output.prepare(out, overwrite=options.overwrite, inputs=inputs, needed=plan.write_bytes)
    started = time.perf_counter()
    try:
        layout = [(t.name, t.out_dtype, t.shape) for t in plan.tasks]
        writer = ShardWriter(tmp, layout, max_shard, workers=cpu_workers())
        ties = TieCount()
        # config, tokenizer, card: written while the tensors stream (which wait on the disk
        # and the kernels, not on the interpreter); the provenance after, with the timings
        files = _Background(
            write_child_files,
            tmp,
            recipe,
            recipe_text,
            plan,
            copy_tokenizer=options.copy_tokenizer,
            compute=compute_record(plan, compute),
        )
        try:
            stream_merge(
                plan,
                torch_device,
                writer=writer,
                seed=options.seed,
                progress=options.progress,
                ties=ties,
            )
        except BaseException:
            writer.abort()
            files.wait(reraise=False)
            raise
        writer.finish()
        files.wait()
        write_provenance(
            tmp,
            recipe,
            sources,
            plan,
            recipe_text=recipe_text,
            device=str(torch_device),
            seconds=time.perf_counter() - started,
            engine="native",
            seed=options.seed,
            compute=compute_record(plan, compute),
            ties=ties.record() if plan.method.name in TIE_RULE_METHODS else None,
        )
        output.commit(tmp, out, overwrite=options.overwrite)
    except OSError as exc:  # the disk: full, gone read-only, an I/O error
        shutil.rmtree(tmp, ignore_errors=True)
        raise KruisingError(
            f"writing the child {out} failed: {exc.strerror or exc}",
            "check free space and that the output folder's file system is writable; "
            "nothing was kept",
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for source in sources.values():
            source.close()
    seconds = time.perf_counter() - started
    console.print(
        f"wrote {out} ({_gb(plan.write_bytes)}, {len(plan.tasks)} tensors) in {seconds:.1f} s"
    )
    return out


class _Background:
    """A call run on a thread; `wait` joins it and raises what it raised."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                fn(*args, **kwargs)
            except BaseException as exc:  # raised again by wait, in the caller's thread
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True, name="child-files")
        self._thread.start()

    def wait(self, reraise: bool = True) -> None:
        self._thread.join()
        if reraise and self._error is not None:
            raise self._error


def write_child_files(
    folder: Path,
    recipe: MergeRecipe,
    recipe_text: str,
    plan: MergePlan | None,
    *,
    copy_tokenizer: bool = True,
    compute: dict[str, Any] | None = None,
) -> None:
    """Everything but the tensors and the provenance: config, generation config, tokenizer,
    ``mergekit_config.yml``, model card. Without a plan (mergekit did the merge), mergekit has
    already written config, generation config and tokenizer. ``copy_tokenizer=False``
    (mergekit's ``--no-copy-tokenizer``): no tokenizer files copied from the donor; one the
    recipe builds is still written, as mergekit writes it."""
    from merger.core.child import write_config, write_generation_config, write_tokenizer
    from merger.share.card import write_model_card

    if plan is not None:
        config = write_config(plan, folder)
        write_generation_config(plan, folder, config)
        if copy_tokenizer or plan.tokenizer is not None:
            write_tokenizer(plan, folder)
        elif recipe.chat_template:
            from merger.core.mergekit_engine import warn

            warn(
                "--no-copy-tokenizer: the recipe's chat_template is not saved (no tokenizer is "
                "written), as in mergekit"
            )
    (folder / "mergekit_config.yml").write_text(recipe_text)
    write_model_card(folder, recipe_text, recipe, compute=compute)


# --- in memory (the sweep) --------------------------------------------------------------------


class ResidentInputs:
    """All input tensors of a recipe's models, loaded once onto the device."""

    def __init__(self, sources: dict[str, ModelSource], device: torch.device) -> None:
        self.sources = sources
        self.device = device
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        for ref, source in sources.items():
            for name in source.tensors:
                self.tensors[(ref, name)] = source.read(name).to(device, copy=True)
            source.close()

    @classmethod
    def load(
        cls, recipe: MergeRecipe, device: str = "auto", *, allow_pickle: bool = False
    ) -> ResidentInputs:
        return cls(open_sources(recipe, allow_pickle=allow_pickle), resolve_device(device))

    def covers(self, recipe: MergeRecipe) -> bool:
        return set(recipe.referenced_models()) <= set(self.sources)


def merge_in_memory(
    recipe: MergeRecipe, inputs: ResidentInputs, *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The child's state dict (HF names, output dtype) without touching the disk."""
    if not inputs.covers(recipe):
        missing = set(recipe.referenced_models()) - set(inputs.sources)
        raise KruisingError(
            f"the loaded inputs lack {', '.join(sorted(missing))}",
            "load ResidentInputs for every model the variants reference",
        )
    sources = {ref: inputs.sources[ref] for ref in recipe.referenced_models()}
    plan = build_plan(recipe, sources)
    return {
        task.name: compute_task(plan, task, [inputs.tensors[i] for i in task.inputs], seed)
        for task in plan.tasks
    }


def merge_variants_streaming(
    recipes: list[MergeRecipe], device: str = "auto", *, seed: int = 0
) -> Iterator[tuple[str, list[torch.Tensor]]]:
    """One pass over the shards for K variants: per output tensor, the K merged tensors.

    Every input tensor is read once per output tensor, however many variants there are;
    use it when the inputs do not fit in memory.
    """
    torch_device = resolve_device(device)
    refs: dict[str, None] = {}
    for recipe in recipes:
        refs.update(dict.fromkeys(recipe.referenced_models()))
    sources = {ref: open_model(ref) for ref in refs}
    plans = [build_plan(r, {ref: sources[ref] for ref in r.referenced_models()}) for r in recipes]
    names = [t.name for t in plans[0].tasks]
    by_name = [{t.name: t for t in p.tasks} for p in plans]
    for i, table in enumerate(by_name):
        if set(table) != set(names):
            raise KruisingError(
                f"variant {i} produces different tensors than variant 0",
                "a one-pass sweep needs variants with the same layer structure",
            )
    try:
        for name in names:
            cache: dict[tuple[str, str], torch.Tensor] = {}
            outputs = []
            for plan, table in zip(plans, by_name, strict=True):
                task = table[name]
                tensors = []
                for key in task.inputs:
                    if key not in cache:
                        cache[key] = sources[key[0]].read(key[1]).to(torch_device)
                    tensors.append(cache[key])
                outputs.append(compute_task(plan, task, tensors, seed))
            yield name, outputs
    finally:
        for source in sources.values():
            source.close()
