"""Sharing children on the Hugging Face Hub: ``push`` a child, ``pull`` a recipe back.

``push`` uploads a child folder (or only its card, recipe and scorecard) in **one** commit made
with huggingface_hub's ``create_commit``: either every file lands or none does. The token comes
from huggingface_hub's own lookup (``HF_TOKEN``, then the ``hf auth login`` cache); it is only
ever put in request headers, never in a file, a card or a message.

``pull`` takes the recipe of a Hub repo or a local folder: ``mergekit_config.yml`` when there is
one, else the ```` ```yaml ```` block holding ``merge_method`` in ``README.md`` — the block mergekit
writes under "### Configuration" and LazyMergekit under "## 🧩 Configuration". It validates the
recipe with :func:`merger.core.recipe.parse_recipe` (errors name the line within the card) and writes
the recipe text exactly as found.

``HF_ENDPOINT`` is read at call time, so a test can point the real client at a local server.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kruising.atomic import write_text
from kruising.console import console
from kruising.errors import KruisingError
from kruising.hub import offline

#: Seconds to wait for the Hub to answer the first request of a pull/push before calling it offline.
HUB_TIMEOUT = 10.0
#: Files under this size are checked for the token before upload (weights are not read twice).
TOKEN_SCAN_LIMIT = 10 * 1024 * 1024
RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"
SCORECARD_FILE = "scorecard.json"
LOGIN_HINT = (
    "log in with `hf auth login` (older clients: `huggingface-cli login`) or set HF_TOKEN "
    "to a token with write access (https://huggingface.co/settings/tokens)"
)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level failures of the client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors.append(module.TransportError)
    return tuple(errors)


def parse_repo_id(text: str, *, action: str) -> tuple[str, str | None]:
    """``org/name[@rev]`` or a Hub URL → (``org/name``, revision); datasets and spaces refused."""
    raw = text.strip()
    ref = re.sub(r"^(https?://)?(www\.)?(huggingface\.co|hf\.co)/", "", raw).strip("/")
    kind = ref.split("/", 1)[0]
    if kind in {"datasets", "spaces"} and ref.count("/") >= 2:
        raise KruisingError(
            f"{raw} is a {kind[:-1]} repo; `merge {action}` works with model repos",
            f"give the model repo as ORG/NAME (without {kind}/)",
        )
    ref = re.sub(r"/(tree|blob|resolve)/([^/]+).*$", r"@\2", ref)
    repo_id, _, revision = ref.partition("@")
    if not _REPO_ID.fullmatch(repo_id) and not re.fullmatch(r"[\w.-]+", repo_id):
        raise KruisingError(
            f"{raw!r} is not a Hub repo id",
            "write it as ORG/NAME, e.g. my-org/geitje-slerp",
        )
    return repo_id, revision or None


def _other_repo_type(api: Any, repo_id: str) -> str | None:
    """``"dataset"`` or ``"space"`` when ``repo_id`` exists as one (model repo not found)."""
    from huggingface_hub.errors import HfHubHTTPError

    for repo_type in ("dataset", "space"):
        try:
            api.repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT)
        except HfHubHTTPError:
            continue
        return repo_type
    return None


def _unreachable(repo_id: str, endpoint: str, exc: BaseException) -> KruisingError:
    return KruisingError(
        f"cannot reach the Hub at {endpoint} for {repo_id} ({type(exc).__name__})",
        "check the network; offline, pull from a local copy (`merge pull FOLDER`) — "
        "HF_HUB_OFFLINE=1 reads only the local Hugging Face cache",
    )


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------


@dataclass
class _Upload:
    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


def _child_files(child: Path) -> Iterator[Path]:
    for path in sorted(child.rglob("*")):
        rel = path.relative_to(child)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield path


def _check_complete(child: Path) -> None:
    """Refuse a folder that is not a whole checkpoint before anything is uploaded."""
    import json

    missing: list[str] = []
    if not (child / "config.json").is_file():
        missing.append("config.json")
    index = child / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise KruisingError(
                f"{index} is not a valid safetensors index",
                "re-run `merge run` for this child",
            ) from None
        missing += sorted({s for s in weight_map.values() if not (child / s).is_file()})
    elif not (child / "model.safetensors").is_file():
        missing.append("model.safetensors (or model.safetensors.index.json + shards)")
    if missing:
        raise KruisingError(
            f"{child} is not a complete child: missing {', '.join(missing)}; nothing was uploaded",
            "re-run `merge run` for it, or push only card + recipe + scorecard with --recipe-only",
        )


def _plan_upload(child: Path, repo_id: str, *, recipe_only: bool) -> list[_Upload]:
    """What goes into the commit. A kruising card is re-rendered with scores and the repo id."""
    import json

    from merger.share.card import find_scorecard, is_kruising_card, render_child_card

    has_recipe = (child / RECIPE_FILE).is_file()
    readme = child / CARD_FILE
    card_bytes: bytes | None = None
    if has_recipe and (not readme.is_file() or is_kruising_card(readme)):
        card_bytes = str(render_child_card(child, repo_id=repo_id)).encode("utf-8")

    if recipe_only:
        if not has_recipe:
            raise KruisingError(
                f"{child} has no {RECIPE_FILE}; --recipe-only uploads card + recipe + scorecard",
                "push a child written by `merge run` (it holds the recipe as given)",
            )
        uploads = [_Upload(RECIPE_FILE, child / RECIPE_FILE)]
        uploads.append(_Upload(CARD_FILE, card_bytes if card_bytes is not None else readme))
        scorecard = find_scorecard(child)
        if scorecard is not None:
            text = json.dumps(scorecard, indent=2, ensure_ascii=False) + "\n"
            uploads.append(_Upload(SCORECARD_FILE, text.encode("utf-8")))
        return uploads

    _check_complete(child)
    uploads = []
    for path in _child_files(child):
        rel = path.relative_to(child).as_posix()
        if rel == CARD_FILE and card_bytes is not None:
            uploads.append(_Upload(rel, card_bytes))
        else:
            uploads.append(_Upload(rel, path))
    if card_bytes is not None and not any(u.path_in_repo == CARD_FILE for u in uploads):
        uploads.append(_Upload(CARD_FILE, card_bytes))
    return uploads


def _refuse_token_in_files(uploads: list[_Upload], token: str) -> None:
    needle = token.encode("utf-8")
    for upload in uploads:
        if upload.size > TOKEN_SCAN_LIMIT:
            continue
        data = upload.source if isinstance(upload.source, bytes) else upload.source.read_bytes()
        if needle in data:
            raise KruisingError(
                f"{upload.path_in_repo} contains your Hugging Face token; nothing was uploaded",
                "remove the token from that file (and revoke it at https://huggingface.co/settings/tokens)",
            )


def _resolve_token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise KruisingError("no Hugging Face token found (HF_TOKEN or a login)", LOGIN_HINT)
    return token


def push(
    child: Path,
    repo_id: str,
    *,
    private: bool = False,
    recipe_only: bool = False,
    token: str | None = None,
) -> str:
    """Upload ``child`` to the model repo ``repo_id`` in one commit; return the repo URL.

    Creates the repo when it does not exist (``private`` then applies). ``recipe_only`` uploads
    README.md, mergekit_config.yml and the scorecard, not the weights.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    child = Path(child)
    if not child.is_dir():
        raise KruisingError(
            f"child folder {child} does not exist", "pass the --out folder of `merge run`"
        )
    repo_id, revision = parse_repo_id(repo_id, action="push")
    if revision:
        raise KruisingError(
            f"push writes the main branch; got a revision in {repo_id}@{revision}",
            "drop the @revision part",
        )
    if offline():
        raise KruisingError(
            f"HF_HUB_OFFLINE is set; cannot push to {repo_id}", "unset HF_HUB_OFFLINE"
        )
    token = _resolve_token(token)
    endpoint = _endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    network = _network_errors()

    try:
        user = api.whoami()
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            raise KruisingError(
                "the Hub rejected your Hugging Face token (401)", LOGIN_HINT
            ) from None
        raise KruisingError(
            f"the Hub refused to identify your token ({status})", LOGIN_HINT
        ) from None
    except network as exc:
        raise _unreachable(repo_id, endpoint, exc) from None
    if "/" not in repo_id:
        repo_id = f"{user.get('name')}/{repo_id}"

    uploads = _plan_upload(child, repo_id, recipe_only=recipe_only)
    _refuse_token_in_files(uploads, token)
    total = sum(u.size for u in uploads)
    console.print(
        f"push {child} → {repo_id}: {len(uploads)} files, {total / 1e6:.1f} MB"
        + (" (card + recipe + scorecard only)" if recipe_only else "")
    )

    created = False
    try:
        try:
            info = api.repo_info(repo_id, repo_type="model", timeout=HUB_TIMEOUT)
        except RepositoryNotFoundError:
            other = _other_repo_type(api, repo_id)
            if other:
                raise KruisingError(
                    f"{repo_id} exists on the Hub as a {other}, not a model repo; nothing was uploaded",
                    f"push the merge to a model repo with another name, e.g. {repo_id}-merge",
                ) from None
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            created = True
        else:
            if private and info.private is False:
                raise KruisingError(
                    f"{repo_id} exists and is public; --private cannot make it private",
                    "make it private in the repo's settings on the Hub, or push to a new repo",
                )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise KruisingError(
            f"could not create or read {repo_id} on the Hub ({status}); nothing was uploaded",
            "check that your token may write to that namespace (" + LOGIN_HINT + ")",
        ) from None
    except network as exc:
        raise _unreachable(repo_id, endpoint, exc) from None

    operations = [
        CommitOperationAdd(
            path_in_repo=u.path_in_repo,
            path_or_fileobj=u.source if isinstance(u.source, bytes) else str(u.source),
        )
        for u in uploads
    ]
    what = "card + recipe + scorecard" if recipe_only else "merged model"
    try:
        api.create_commit(
            repo_id,
            operations,
            commit_message=f"kruising: upload {what} from {child.resolve().name}",
            repo_type="model",
        )
    except (HfHubHTTPError, ValueError, RuntimeError, *network) as exc:
        status = ""
        response = getattr(exc, "response", None)
        if response is not None:
            status = f" ({response.status_code})"
        state = "the new repo is empty" if created else "the repo is as it was"
        raise KruisingError(
            f"upload to {repo_id} failed{status}: nothing was committed, {state}",
            f"run the same `merge push` again; the Hub said: {_first_line(exc)}",
        ) from None
    url = f"{endpoint}/{repo_id}"
    console.print(f"pushed {len(uploads)} files to {url}")
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------


@dataclass
class FoundRecipe:
    """A recipe found in a repo or folder: the text as written, where, and its first line there."""

    text: str
    source: str
    first_line: int = 1


_FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$")
_MERGE_METHOD = re.compile(r"^\s*merge_method\s*:", re.MULTILINE)


def yaml_blocks(card: str) -> list[tuple[int, str]]:
    """Fenced ``yaml``/``yml`` blocks of a Markdown card: (first content line, 1-based; text)."""
    blocks: list[tuple[int, str]] = []
    lines = card.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, info = len(match.group(1)), match.group(2), match.group(3).lower()
        body: list[str] = []
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        if info in {"yaml", "yml"}:
            blocks.append((i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def recipe_from_card(card: str, source: str) -> FoundRecipe:
    """The mergekit recipe inside a model card: the first yaml block with ``merge_method``."""
    blocks = yaml_blocks(card)
    for first_line, text in blocks:
        if _MERGE_METHOD.search(text):
            return FoundRecipe(text=text, source=source, first_line=first_line)
    if any(re.search(r"^\s*experts\s*:", text, re.MULTILINE) for _, text in blocks):
        why = "its yaml block is a mergekit-moe config (experts:), not a merge recipe"
    elif blocks:
        why = f"none of its {len(blocks)} ```yaml blocks has merge_method"
    else:
        why = "it has no ```yaml block"
    raise KruisingError(
        f"no merge recipe in {source}: {why}",
        "pull from a repo made with `merge push`, mergekit or LazyMergekit (they carry the recipe), "
        "or write the recipe by hand",
    )


def _recipe_from_folder(folder: Path) -> FoundRecipe:
    config = folder / RECIPE_FILE
    if config.is_file():
        return FoundRecipe(config.read_text(encoding="utf-8"), str(config))
    card = folder / CARD_FILE
    if card.is_file():
        return recipe_from_card(card.read_text(encoding="utf-8"), str(card))
    raise KruisingError(
        f"{folder} has neither {RECIPE_FILE} nor {CARD_FILE}",
        "pull from a child folder written by `merge run` or a downloaded model repo",
    )


def _recipe_from_file(path: Path) -> FoundRecipe:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in {".md", ".markdown"}:
        return recipe_from_card(text, str(path))
    return FoundRecipe(text, str(path))


def _recipe_from_hub(repo_id: str, revision: str | None) -> FoundRecipe:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = _endpoint()
    where = f"{repo_id}@{revision}" if revision else repo_id

    def read(filename: str, at: str | None = revision, **kwargs: Any) -> str:
        path = hf_hub_download(repo_id, filename, revision=at, endpoint=endpoint, **kwargs)
        return Path(path).read_text(encoding="utf-8")

    if offline():
        for filename in (RECIPE_FILE, CARD_FILE):
            try:
                text = read(filename, local_files_only=True)
            except (LocalEntryNotFoundError, OSError):
                continue
            label = f"{filename} of {where}"
            return (
                FoundRecipe(text, label)
                if filename == RECIPE_FILE
                else recipe_from_card(text, label)
            )
        raise KruisingError(
            f"HF_HUB_OFFLINE is set and {where} is not in the local Hugging Face cache",
            "unset HF_HUB_OFFLINE to download it, or pull from a local copy: `merge pull FOLDER`",
        )

    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT)
    except RevisionNotFoundError:
        raise KruisingError(
            f"{repo_id} has no revision {revision!r}",
            "use a branch, tag or commit of the repo, or leave out @revision",
        ) from None
    except RepositoryNotFoundError:
        other = _other_repo_type(api, repo_id)
        if other:
            raise KruisingError(
                f"{repo_id} is a {other} on the Hub, not a model repo; it holds no merge recipe",
                "pull from the model repo of the merge",
            ) from None
        raise KruisingError(
            f"model repo {repo_id} not found on the Hub (or it is private and you are not logged in)",
            "check the name; for a private repo " + LOGIN_HINT,
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise KruisingError(f"the Hub refused {repo_id} ({status})", LOGIN_HINT) from None
    except _network_errors() as exc:
        raise _unreachable(repo_id, endpoint, exc) from None

    files = {s.rfilename for s in info.siblings or []}
    for filename in (RECIPE_FILE, CARD_FILE):
        if filename not in files:
            continue
        label = f"{filename} of {where}"
        try:
            text = read(filename, info.sha or revision, etag_timeout=HUB_TIMEOUT)
        except (HfHubHTTPError, *_network_errors()) as exc:
            raise KruisingError(
                f"could not download {label} ({type(exc).__name__})",
                "try again; or download the repo and pull from the folder",
            ) from None
        return (
            FoundRecipe(text, label) if filename == RECIPE_FILE else recipe_from_card(text, label)
        )
    raise KruisingError(
        f"{where} has neither {RECIPE_FILE} nor {CARD_FILE}: no recipe to pull",
        "pull from a repo made with `merge push`, mergekit or LazyMergekit",
    )


def find_recipe(source: str) -> FoundRecipe:
    """Locate the recipe of ``source``: a local folder or file, else a Hub model repo id."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _recipe_from_folder(path)
    if path.is_file():
        return _recipe_from_file(path)
    looks_local = source.startswith((".", "/", "~")) or (
        source.count("/") > 1 and "://" not in source
    )
    if looks_local and not source.startswith(("datasets/", "spaces/")):
        raise KruisingError(
            f"no such folder: {source}",
            "give a local child folder or a Hub repo id ORG/NAME",
        )
    repo_id, revision = parse_repo_id(source, action="pull")
    if "/" not in repo_id:
        raise KruisingError(
            f"no such folder: {source}, and not a Hub repo id (ORG/NAME)",
            "give a local child folder or a Hub repo id ORG/NAME",
        )
    return _recipe_from_hub(repo_id, revision)


def pull(source: str, out: Path | None = None, *, overwrite: bool = False) -> Path:
    """Write the recipe of ``source`` (Hub repo id or local folder) to ``out``; return ``out``.

    The recipe is validated first (errors name the line in the card or file it came from) and
    written exactly as found. ``out`` defaults to ``recipe.yaml``; an existing different file is
    only replaced with ``overwrite``.
    """
    from merger.core.recipe import parse_recipe

    found = find_recipe(source)
    padded = "\n" * (found.first_line - 1) + found.text
    recipe = parse_recipe(padded, source=found.source)

    out = Path(out) if out is not None else Path("recipe.yaml")
    if out.is_dir():
        out = out / "recipe.yaml"
    if out.exists() and not overwrite and out.read_text(encoding="utf-8") != found.text:
        raise KruisingError(
            f"{out} exists and holds a different recipe",
            "choose another --out, or pass --force to replace it",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, found.text)

    parents = recipe.referenced_models()
    console.print(
        f"recipe from {found.source}: merge_method {recipe.merge_method}, "
        f"{len(parents)} parent{'s' if len(parents) != 1 else ''}; wrote {out}"
    )
    for ref in parents:
        local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
        if local and not Path(ref).expanduser().exists():
            console.print(
                f"[yellow]note:[/] parent {ref} is a local folder that is not here; "
                "`merge run` needs it (copy it, or edit the recipe to its Hub id)"
            )
    return out
