"""What a resume loads besides the weights, without running a checkpoint's code.

accelerate saves a registered scheduler as ``custom_checkpoint_0.pkl`` and loads it back with
``torch.load(weights_only=False)``: a pickle from a shared disk then runs whatever it holds.
So the scheduler is not registered: it is a pure function of the step (`restore_scheduler`
sets it to the checkpoint's step), and a checkpoint that holds a custom pickle is refused.

accelerate also skips, silently, RNG states it cannot read (``random_states_N.pkl``); the run
then goes on with other random numbers. `check_checkpoint` reads them first, weights-only
(tensors, numbers and numpy arrays, no code), and a damaged one is an error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pretrain.errors import PretrainError

#: what accelerate names the pickled state of a registered object
CUSTOM_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def check_checkpoint(folder: Path, rank: int) -> None:
    """Refuse a checkpoint that would unpickle code or lose its RNG state on resume."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if CUSTOM_PICKLE.match(p.name))
    if pickles:
        raise PretrainError(
            f"resume: {folder} holds {pickles[0]}, a pickle that accelerate would load with "
            "weights_only=False (it can run any code); kruising does not write it",
            "if you trust this checkpoint, delete the file and resume: the learning-rate "
            "schedule is restored from the step",
        )
    rng = folder / f"random_states_{rank}.pkl"
    if not rng.is_file():
        raise PretrainError(
            f"resume: {rng.name} is missing from {folder}: the run would go on with other "
            "random numbers",
            "resume from a complete step-N folder (checkpoints are written whole or not at all)",
        )
    from accelerate.utils import load

    try:
        states = load(rng, map_location="cpu")  # weights_only=True, numpy arrays allowed
    except Exception as exc:
        raise PretrainError(
            f"resume: {rng} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})",
            "resume from an older step-N folder",
        ) from None
    missing = [
        k
        for k in ("random_state", "numpy_random_seed", "torch_manual_seed")
        if not isinstance(states, dict) or k not in states
    ]
    if missing:
        raise PretrainError(
            f"resume: {rng} lacks {', '.join(missing)}", "resume from an older step-N folder"
        )


def restore_scheduler(scheduler: Any, step: int) -> None:
    """Set a LambdaLR to where it is after ``step`` optimizer steps (one `step()` each)."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [
        base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
