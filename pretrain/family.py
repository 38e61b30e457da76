"""The tiny Mistral family: `base`, `nl`, `instruct`, trained by the `pretrain` code on the fact world.

| member | stands in for | made by |
|---|---|---|
| base | Mistral-7B-v0.1 | from scratch on English fact-world text |
| nl | GEITje-7B | base continued on Dutch fact-world text (same `pretrain.train.run`) |
| instruct | Mistral-7B-Instruct | base fine-tuned on English chat Q&A (`[INST] ... [/INST]`) |

Every member is a `save_pretrained` MistralForCausalLM folder with the real Mistral-7B-v0.1
tokenizer and the same chat template. The build measures the facts the demo relies on (held-out
perplexities, chat-format log-probs) and writes them, with a fingerprint of the code and settings,
into `family.json` — written last, so a folder with `family.json` is a complete family. A build
goes into a temporary sibling and is renamed into place; a crash leaves no half family behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kruising.atomic import replace_folder, temp_sibling
from pretrain.errors import PretrainError

MEMBERS = ("base", "nl", "instruct")
MARKER = "family.json"

# model: MistralConfig fields; steps per member; context x micro_batch tokens per step.
SIZES: dict[str, dict[str, Any]] = {
    "test": {
        "model": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 8,
            "max_position_embeddings": 256,
            "tie_word_embeddings": False,
        },
        "context_length": 64,
        "micro_batch": 16,
        "steps": {"base": 40, "nl": 20, "instruct": 16},
        "lr": {"base": 1e-2, "nl": 1e-2, "instruct": 5e-3},
    },
    "default": {
        "model": {
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 512,
            "tie_word_embeddings": False,
        },
        "context_length": 128,
        "micro_batch": 8,
        "steps": {"base": 200, "nl": 150, "instruct": 80},
        "lr": {"base": 3e-3, "nl": 2e-3, "instruct": 1e-3},
    },
}

_CODE_FILES = (
    "world.py",
    "family.py",
    "train.py",
    "data.py",
    "config.py",
    "tokenizer.py",
    "perplexity.py",
    "state.py",
)


def fingerprint(size: str, seed: int) -> str:
    """Hash of the settings, the generator and training code, and the library versions."""
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps({"size": SIZES[size], "seed": seed}, sort_keys=True).encode())
    here = Path(__file__).parent
    for name in _CODE_FILES:
        h.update((here / name).read_bytes())
    h.update(f"{torch.__version__} {transformers.__version__}".encode())
    return h.hexdigest()[:16]


def _complete(out: Path, fp: str) -> dict[str, Path] | None:
    marker = out / MARKER
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != fp:
        return None
    members = {m: out / m for m in info.get("members", [])}
    if not members or not all((p / "config.json").is_file() for p in members.values()):
        return None
    return members


@contextlib.contextmanager
def _lock(out: Path):
    """One builder per family folder across processes (several test sessions share .cache/)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_family(
    out: Path, size: str = "test", seed: int = 0, progress: bool = True
) -> dict[str, Path]:
    """Build (or reuse) the tiny family under `out`; returns ``{"base": Path, "nl": ..., ...}``."""
    if size not in SIZES:
        raise PretrainError(f"unknown family size {size!r}", f"use one of {', '.join(SIZES)}")
    out = Path(out)
    fp = fingerprint(size, seed)
    with _lock(out):
        found = _complete(out, fp)
        if found is not None:
            return found
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not (out / MARKER).is_file():  # never replace a folder of someone else's
                raise PretrainError(
                    f"{out} exists and is not a family folder (no {MARKER}); building the "
                    "family there would replace it",
                    "choose a new or empty --out for the family",
                )
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_sibling(out)
        try:
            _build(tmp, size, seed, fp, progress)
            replace_folder(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        found = _complete(out, fp)
        assert found is not None
        return found


def _write_corpora(folder: Path, size: str, seed: int) -> dict[str, Path]:
    """The family's corpora as jsonl files, read back through the normal `datasets` loader."""
    from pretrain import world

    s = SIZES[size]
    per_step = s["context_length"] * s["micro_batch"]
    folder.mkdir(parents=True)

    def n_docs(member: str, tokens_per_doc: int) -> int:
        return s["steps"][member] * per_step // tokens_per_doc + 64

    corpora = {
        "en": [{"text": t} for t in world.training_documents("en", n_docs("base", 30), seed)],
        "nl": [{"text": t} for t in world.training_documents("nl", n_docs("nl", 35), seed)],
        "chat-en": [
            {"messages": m} for m in world.chat_conversations("en", n_docs("instruct", 20), seed)
        ],
    }
    paths = {}
    for name, rows in corpora.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[name] = path
    return paths


def family_threads() -> int:
    """torch intra-op threads for the build: 1 unless KRUISING_FAMILY_THREADS says otherwise.

    The members are tiny (64 wide): an op takes microseconds, and splitting it over threads
    only adds a barrier per op. On a busy machine a thread waits there until the other one is
    scheduled again, spinning meanwhile: two threads took 2.7-4.4x the CPU time per step of one
    on a loaded machine (README, bench/family_under_load.py --steps-only). One thread
    has no barrier to wait at, and its CPU time per step does not grow with the load (eval scores
    small models on one thread for the same reason: kruising.device.cpu_threads_for)."""
    value = os.environ.get("KRUISING_FAMILY_THREADS", "1")
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise PretrainError(
            f"KRUISING_FAMILY_THREADS must be a whole number >= 1, got {value!r}",
            "unset it (1 thread, the fastest for the tiny family) or set e.g. 2",
        )
    return threads


def _build(tmp: Path, size: str, seed: int, fp: str, progress: bool) -> None:
    """On one torch thread (family_threads), with freed memory kept in the process
    (kruising.malloc.kept_freed_memory): without it, half of a training step's CPU time went
    into the kernel zero-filling the pages of the 131 MB logits glibc had unmapped the step
    before (README, "The build on a busy machine")."""
    from kruising.device import torch_threads
    from kruising.malloc import kept_freed_memory

    with torch_threads(family_threads()), kept_freed_memory():
        _build_members(tmp, size, seed, fp, progress)


def _build_members(tmp: Path, size: str, seed: int, fp: str, progress: bool) -> None:
    from kruising.console import console
    from pretrain.config import PretrainConfig, Source
    from pretrain.train import run
    from pretrain.world import CHAT_TEMPLATE

    s = SIZES[size]
    t0 = time.perf_counter()
    if progress:
        console.print(f"family: building size={size} seed={seed} into {tmp.parent}")
    corpora = _write_corpora(tmp / "corpus", size, seed)
    plan = {
        "base": {
            "model": s["model"],
            "tokenizer": "mistral-common",
            "sources": [Source(path=str(corpora["en"]))],
        },
        "nl": {"init_from": str(tmp / "base"), "sources": [Source(path=str(corpora["nl"]))]},
        "instruct": {
            "init_from": str(tmp / "base"),
            "sources": [Source(path=str(corpora["chat-en"]), messages_field="messages")],
        },
    }
    timings: dict[str, float] = {}
    losses: dict[str, float] = {}
    for k, member in enumerate(MEMBERS, start=1):
        t = time.perf_counter()
        if progress:
            console.print(_member_line(k, member, s["steps"], timings, t - t0))
        config = PretrainConfig(
            **plan[member],
            output_dir=str(tmp / "runs" / member),
            context_length=s["context_length"],
            micro_batch=s["micro_batch"],
            max_steps=s["steps"][member],
            lr=s["lr"][member],
            warmup_fraction=0.1,
            schedule="cosine",
            dtype="float32",
            device="cpu",
            seed=seed,
            log_every=5,
            progress=progress,
            plot=True,
            chat_template=CHAT_TEMPLATE,
        )
        result = run(config, chat_template=CHAT_TEMPLATE)
        result.model_dir.rename(tmp / member)
        timings[member] = round(time.perf_counter() - t, 1)
        losses[member] = round(result.final_loss, 4)
    shutil.rmtree(tmp / "corpus")

    if progress:
        console.print(
            f"family: measuring the {len(MEMBERS)} members on held-out text and questions"
        )
    facts = measure(tmp)
    info = {
        "fingerprint": fp,
        "size": size,
        "seed": seed,
        "members": list(MEMBERS),
        "final_train_loss": losses,
        "seconds": {**timings, "total": round(time.perf_counter() - t0, 1)},
        "facts": facts,
    }
    if progress:
        _print_facts(console, info)
    (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")


_ABOUT = {
    "base": "from scratch on English text",
    "nl": "base continued on Dutch text",
    "instruct": "base fine-tuned on English chats",
}


def _member_line(
    k: int, member: str, steps: dict[str, int], done: dict[str, float], so_far: float
) -> str:
    """``family: member 2/3, nl (...), 150 steps; 41 s so far, about 48 s left``: the rate of
    the members already trained (same model, same tokens per step) times the steps to go."""
    todo = sum(steps[m] for m in MEMBERS[k - 1 :])
    line = f"family: member {k}/{len(MEMBERS)}, {member} ({_ABOUT[member]}), {steps[member]} steps"
    if done:
        per_step = sum(done.values()) / sum(steps[m] for m in done)
        line += f"; {so_far:.0f} s so far, about {per_step * todo:.0f} s of training left"
    else:
        line += f" of {todo} for the family"
    return line


# ---- measured facts -----------------------------------------------------------------------------


def _load(folder: Path):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _sequence_logprobs(
    model, sequences: list[list[int]], starts: list[int], batch: int = 32
) -> list[float]:
    """Sum of log-probs of tokens ``seq[start:]`` of each sequence, in right-padded batches."""
    import torch

    out: list[float] = []
    for lo in range(0, len(sequences), batch):
        chunk, chunk_starts = sequences[lo : lo + batch], starts[lo : lo + batch]
        width = max(len(seq) for seq in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # the (vocab-sized) head runs only where a scored token is predicted, in one call
        rows = torch.cat(
            [
                torch.full((len(q) - s,), r)
                for r, (q, s) in enumerate(zip(chunk, chunk_starts, strict=True))
            ]
        )
        cols = torch.cat(
            [torch.arange(s - 1, len(q) - 1) for q, s in zip(chunk, chunk_starts, strict=True)]
        )
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            logits = model.get_output_embeddings()(hidden[rows, cols]).float()
            target = ids[rows, cols + 1]
            logp = logits.gather(-1, target[:, None])[:, 0] - torch.logsumexp(logits, -1)
        sums = torch.zeros(len(chunk)).index_add_(0, rows, logp)
        out += sums.tolist()
    return out


def perplexity(model, tokenizer, texts: list[str]) -> float:
    """Held-out perplexity of `texts` as `pretrain.perplexity` defines it (BOS + text, every
    text token scored, EOS not), the definition `merge eval` uses. Each text fits the model's
    positions, so one window per text is lm-eval's rolling windows."""
    from pretrain.perplexity import perplexity_metrics, text_tokens

    bos = tokenizer.bos_token_id
    scored = [text_tokens(tokenizer, t) for t in texts]
    seqs = [[bos, *ids] for ids in scored]
    total = sum(_sequence_logprobs(model, seqs, [1] * len(seqs)))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return perplexity_metrics(total, sum(len(ids) for ids in scored), n_bytes)["ppl"]


def _with_continuation(tokenizer, prompt: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of prompt + continuation (BOS first) and where the continuation starts."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:  # tokenization merged across the boundary
        full_ids = prompt_ids + tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if not prompt_ids or prompt_ids[0] != tokenizer.bos_token_id:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
        full_ids = [tokenizer.bos_token_id, *full_ids]
    return full_ids, len(prompt_ids)


def continuation_logprob(model, tokenizer, prompt: str, continuation: str) -> tuple[float, int]:
    """Sum of log-probs of `continuation` after `prompt` (prompt gets BOS unless it has one)."""
    ids, start = _with_continuation(tokenizer, prompt, continuation)
    return _sequence_logprobs(model, [ids], [start])[0], len(ids) - start


def qa_scores(model, tokenizer, questions: list[dict], chat: bool) -> dict[str, float]:
    """Answer log-prob per token and accuracy (answer beats every distractor) in plain or chat form."""
    seqs, starts, groups = [], [], []
    for q in questions:
        if chat:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": q["user"]}], tokenize=False, add_generation_prompt=True
            )
        else:
            prompt = q["prompt"]
        options = [
            _with_continuation(tokenizer, prompt, c) for c in [q["answer"], *q["distractors"]]
        ]
        groups.append((len(seqs), len(options), len(options[0][0]) - options[0][1]))
        seqs += [o[0] for o in options]
        starts += [o[1] for o in options]
    scores = _sequence_logprobs(model, seqs, starts)
    per_token, correct = [], 0
    for first, n, answer_tokens in groups:
        answer, wrong = scores[first], scores[first + 1 : first + n]
        per_token.append(answer / answer_tokens)
        correct += answer > max(wrong)
    return {
        "answer_logprob_per_token": round(sum(per_token) / len(per_token), 4),
        "accuracy": round(correct / len(questions), 4),
    }


def measure(folder: Path) -> dict[str, Any]:
    """Held-out perplexities (nl, en) of every member, and plain/chat Q&A scores per language."""
    import torch

    from pretrain.world import heldout_questions, heldout_text

    torch.set_grad_enabled(False)
    try:
        questions = heldout_questions()
        by_lang = {lang: [q for q in questions if q["lang"] == lang] for lang in ("nl", "en")}
        facts: dict[str, Any] = {}
        for member in MEMBERS:
            model, tokenizer = _load(folder / member)
            entry: dict[str, Any] = {
                "ppl_nl": round(perplexity(model, tokenizer, heldout_text("nl")), 3),
                "ppl_en": round(perplexity(model, tokenizer, heldout_text("en")), 3),
            }
            for lang, qs in by_lang.items():
                for form in ("plain", "chat"):
                    entry[f"{form}_{lang}"] = qa_scores(model, tokenizer, qs, chat=form == "chat")
            facts[member] = entry
    finally:
        torch.set_grad_enabled(True)
    b, n, i = facts["base"], facts["nl"], facts["instruct"]
    key = "answer_logprob_per_token"
    facts["checks"] = {
        "nl_lower_dutch_ppl_than_base": n["ppl_nl"] < b["ppl_nl"],
        "base_lower_english_ppl_than_nl": b["ppl_en"] < n["ppl_en"],
        "instruct_follows_chat_better_than_base": i["chat_en"][key] > b["chat_en"][key],
    }
    return facts


def _print_facts(console, info: dict[str, Any]) -> None:
    f = info["facts"]
    console.print(f"family: built in {info['seconds']['total']} s ({info['seconds']})")
    for member in MEMBERS:
        e = f[member]
        console.print(
            f"  {member:9s} ppl nl {e['ppl_nl']:9.2f}  ppl en {e['ppl_en']:9.2f}  "
            f"chat-en answer logp/tok {e['chat_en']['answer_logprob_per_token']:7.3f}  "
            f"acc plain-nl {e['plain_nl']['accuracy']:.2f} chat-nl {e['chat_nl']['accuracy']:.2f} "
            f"chat-en {e['chat_en']['accuracy']:.2f}"
        )
    for name, ok in f["checks"].items():
        console.print(f"  {'ok ' if ok else 'NOT'} {name.replace('_', ' ')}")
