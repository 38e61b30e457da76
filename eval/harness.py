"""`--lm-eval TASKS`: run EleutherAI's lm-evaluation-harness on the same model (optional extra)."""

from __future__ import annotations

from typing import Any

from eval.errors import EvalError

INSTALL_HINT = "pip install 'kruising[lm-eval]' (the tasks also need the Hub for their datasets)"


def parse_tasks(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise EvalError("--lm-eval got no task names", "e.g. --lm-eval arc_nl,hellaswag_nl")
    return names


def require_lm_eval() -> None:
    """Fail early, before any model is loaded, when the optional extra is missing."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("lm-evaluation-harness is not installed", INSTALL_HINT)


def run_lm_eval(
    model, tokenizer, tasks: list[str], *, batch_size: int = 16, limit: int | None = None
) -> dict[str, Any]:
    """Numbers of lm-eval's ``simple_evaluate`` for ``tasks``, as the scorecard's ``lm_eval``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise EvalError("lm-evaluation-harness is not installed", INSTALL_HINT) from exc
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except (KeyError, ValueError) as exc:
        raise EvalError(
            f"lm-eval cannot run tasks {', '.join(tasks)}: {exc}".splitlines()[0],
            "check the task names with `lm-eval ls tasks`",
        ) from exc
    except (OSError, ConnectionError) as exc:
        raise EvalError(
            f"lm-eval tasks {', '.join(tasks)} need their datasets and they cannot be fetched "
            f"({type(exc).__name__})",
            "run where the Hub is reachable, or pre-download the datasets into the HF cache",
        ) from exc
    except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many types
        raise EvalError(
            f"lm-eval failed on {', '.join(tasks)}: {type(exc).__name__}: {exc}".splitlines()[0],
            "rerun with --verbose for the traceback; offline, the tasks' datasets are missing",
        ) from exc
    if not output or "results" not in output:
        raise EvalError(f"lm-eval returned no results for {', '.join(tasks)}", INSTALL_HINT)
    results = {
        task: {k: v for k, v in numbers.items() if isinstance(v, int | float | str)}
        for task, numbers in output["results"].items()
    }
    return {
        "tasks": tasks,
        "limit": limit,
        "version": getattr(lm_eval, "__version__", None),
        "results": results,
    }
