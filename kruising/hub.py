"""Model references and the Hugging Face Hub: what is a Hub id, are we offline, fetch a snapshot.

A model reference is a local folder or a Hub id ``org/name[@revision]``. Offline
(``HF_HUB_OFFLINE``, read as huggingface_hub reads it) a Hub id is served from the local cache
or fails at once with an error naming it, never a hang.

Light module: huggingface_hub is imported only when a snapshot is fetched.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from kruising.errors import KruisingError

#: ``org/name`` (without the ``@revision``), as the Hub spells repo ids.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: The values huggingface_hub reads as true in its boolean environment variables.
_TRUE = {"1", "ON", "YES", "TRUE"}


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; ``"org/name"`` → ``("org/name", None)``."""
    name, _, revision = ref.partition("@")
    return name, revision or None


def is_hub_id(ref: str) -> bool:
    """True for ``org/name`` or ``org/name@revision``; a path (``./x``, ``/x``, ``~/x``) is not."""
    if ref.startswith((".", "/", "~")):
        return False
    return HUB_ID.fullmatch(split_ref(ref)[0]) is not None


def strip_revision(ref: str) -> str:
    """``org/name@rev`` → ``org/name``; anything that is not a Hub id (a path may hold ``@``)
    unchanged."""
    return split_ref(ref)[0] if is_hub_id(ref) else ref


def offline(*, datasets: bool = False) -> bool:
    """Whether the Hub must not be asked: ``HF_HUB_OFFLINE`` (and, for datasets,
    ``HF_DATASETS_OFFLINE``) set to 1/ON/YES/TRUE, as huggingface_hub reads them, or
    huggingface_hub already imported in offline mode."""
    names = ["HF_HUB_OFFLINE", *(["HF_DATASETS_OFFLINE"] if datasets else [])]
    if any(os.environ.get(name, "").strip().upper() in _TRUE for name in names):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def resolve_model(
    ref: str,
    *,
    allow_patterns: Sequence[str] | None = None,
    error: type[KruisingError] = KruisingError,
) -> Path | None:
    """The local folder of a model reference: the folder itself, or a Hub snapshot.

    None when ``ref`` is neither an existing path nor a Hub id (the caller says what it
    expected). ``allow_patterns`` limits what a snapshot fetches (default: the whole repo).
    Failures are ``error`` (a `KruisingError` subclass of the caller's room).
    """
    for local in (Path(ref).expanduser(), Path(split_ref(ref)[0]).expanduser()):
        if local.exists():
            if not local.is_dir():
                raise error(
                    f"model {ref} is a file, not a checkpoint folder",
                    "point the recipe at the folder that holds config.json and the shards",
                )
            return local
    if not is_hub_id(ref):
        return None
    return snapshot(ref, allow_patterns=allow_patterns, error=error)


def snapshot(
    ref: str,
    *,
    allow_patterns: Sequence[str] | None = None,
    error: type[KruisingError] = KruisingError,
) -> Path:
    """Fetch (or, offline, find in the local cache) the snapshot of Hub model ``ref``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, revision = split_ref(ref)
    no_network = offline()
    patterns = list(allow_patterns) if allow_patterns is not None else None
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            local_files_only=no_network,
            etag_timeout=10,
        )
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise error(
            f"Hub model {ref} not found or not accessible ({type(exc).__name__})",
            "check the id, or log in with `hf auth login` for gated/private repos",
        ) from None
    except RevisionNotFoundError:
        raise error(
            f"Hub model {repo_id} has no revision {revision}", "check the @revision"
        ) from None
    except LocalEntryNotFoundError as exc:
        if no_network:
            raise error(
                f"Hub model {ref} is not in the local cache and HF_HUB_OFFLINE is set",
                "download it where the Hub is reachable (hf download), unset HF_HUB_OFFLINE, "
                "or pass a local folder",
            ) from None
        raise error(
            f"cannot fetch Hub model {ref}: the Hub is unreachable ({type(exc).__name__})",
            "check the network, or download it where the Hub is reachable (hf download) "
            "and pass the local folder",
        ) from None
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise error(
            f"cannot fetch Hub model {ref}: {type(exc).__name__}: {reason}",
            "check the network (or set HF_HUB_OFFLINE=1 to use only the local cache)",
        ) from None
    return Path(path)
