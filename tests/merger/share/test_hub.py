"""`merge push` / `merge pull` against the real huggingface_hub client and a local fake Hub.

The fake Hub is an ``http.server`` on 127.0.0.1 that answers the calls huggingface_hub 2.x makes
for ``whoami``, ``repo_info``, ``create_repo`` and ``create_commit`` (validate-yaml, preupload,
commit) and for ``hf_hub_download`` (HEAD + GET on ``/resolve/``). Its preupload answer puts every
file on the "regular" upload mode, so content travels base64 inside the commit's NDJSON and no
LFS or Xet transfer is attempted: the test sees every byte that arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kruising.errors import KruisingError
from tests.helpers import load_tensors

TOKEN = "hf_kruisingTestToken0123456789abcdefXYZ"
USER = "tester"

RECIPE = """\
# GEITje × Mistral, halfway
merge_method: slerp
base_model: mistralai/Mistral-7B-v0.1
slices:
  - sources:
      - model: mistralai/Mistral-7B-v0.1
        layer_range: [0, 32]
      - model: Rijgersberg/GEITje-7B
        layer_range: [0, 32]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""

SCORECARD = {
    "model": "child",
    "suite": "nl",
    "probes": {
        "cultuur": {"acc": 0.42, "acc_norm": 0.47, "n": 150},
        "grammatica": {"acc": 0.81, "n": 150},
    },
    "dutch_score": 0.61,
    "english_score": 0.55,
    "seconds": 31.5,
}


# --------------------------------------------------------------------------------------------
# The fake Hub
# --------------------------------------------------------------------------------------------


@dataclass
class Repo:
    repo_type: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)

    @property
    def sha(self) -> str:
        return hashlib.sha1("".join(self.commits).encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeHub:
    """State of the fake Hub; ``fail_commit`` makes the commit endpoint answer 500."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.fail_commit = False
        self.lfs_suffixes: tuple[str, ...] = ()  # files the preupload answer puts on LFS
        self.fail_lfs_upload = False
        self.lfs_blobs: dict[str, bytes] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add_repo(self, repo_id: str, repo_type: str = "model", **files: bytes) -> Repo:
        repo = Repo(repo_type=repo_type, files=dict(files))
        if files:
            repo.commits.append("seed")
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def calls(self, pattern: str) -> list[Request]:
        return [r for r in self.requests if re.search(pattern, f"{r.method} {r.path}")]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        # -- plumbing ------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(
            self, status: int, payload: object = None, headers: dict | None = None, raw=None
        ) -> None:
            body = raw if raw is not None else json.dumps(payload or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {TOKEN}"

        def _not_found(self) -> None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

        def _record(self) -> bytes:
            body = self._body() if self.command in ("POST", "PUT") else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            hub.requests.append(Request(self.command, self.path, headers, body))
            return body

        # -- routes --------------------------------------------------------------------------
        def do_GET(self) -> None:
            self._record()
            path = self.path.split("?", 1)[0]
            if path == "/api/whoami-v2":
                if not self._authorized():
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                return self._send(200, {"name": USER, "type": "user", "orgs": [{"name": "org"}]})
            info = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(/revision/.+)?", path)
            if info:
                repo = hub.repos.get((info.group(1)[:-1], info.group(2)))
                if repo is None:
                    return self._not_found()
                siblings = [{"rfilename": name} for name in sorted(repo.files)]
                return self._send(
                    200,
                    {"id": info.group(2), "sha": repo.sha, "private": repo.private,
                     "siblings": siblings},
                )  # fmt: skip
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if resolve:
                repo = hub.repos.get(("model", resolve.group(1)))
                if repo is None:
                    return self._not_found()
                content = repo.files.get(resolve.group(3))
                if content is None:
                    return self._send(
                        404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
                    )
                etag = hashlib.sha1(content).hexdigest()
                return self._send(
                    200, raw=content, headers={"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"'}
                )
            self._send(404, {"error": f"fake hub: no route GET {path}"})

        do_HEAD = do_GET

        def do_POST(self) -> None:
            body = self._record()
            path = self.path.split("?", 1)[0]
            if not self._authorized():
                return self._send(401, {"error": "Invalid credentials in Authorization header"})
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_type = payload.get("type") or "model"
                repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
                if (repo_type, repo_id) in hub.repos:
                    return self._send(409, {"error": "You already created this model repo"})
                repo = hub.add_repo(repo_id, repo_type)
                repo.private = payload.get("visibility") == "private"
                return self._send(200, {"url": f"{hub.url}/{repo_id}"})
            if path == "/api/validate-yaml":
                return self._send(200, {"errors": [], "warnings": []})
            upload = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if upload:
                repo = hub.repos.get(("model", upload.group(1)))
                if repo is None:
                    return self._not_found()
                if upload.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    modes = [
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if f["path"].endswith(hub.lfs_suffixes or "\0")
                            else "regular",
                            "shouldIgnore": False,
                        }
                        for f in files
                    ]  # fmt: skip
                    return self._send(200, {"files": modes})
                if hub.fail_commit:
                    return self._send(500, {"error": "fake hub: commit failed"})
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                added = {}
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_blobs:
                            return self._send(400, {"error": f"LFS object {value['oid']} missing"})
                        added[value["path"]] = hub.lfs_blobs[value["oid"]]
                    else:
                        assert line["key"] == "file", line
                        added[value["path"]] = base64.b64decode(value["content"])
                repo.files.update(added)
                repo.commits.append(lines[0]["value"]["summary"])
                return self._send(
                    200,
                    {"commitUrl": f"{hub.url}/{upload.group(1)}/commit/{repo.sha}",
                     "commitOid": repo.sha, "pullRequestUrl": None},
                )  # fmt: skip
            batch = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if batch:
                objects = [
                    {"oid": o["oid"], "size": o["size"],
                     "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                    for o in json.loads(body)["objects"]
                ]  # fmt: skip
                return self._send(200, {"transfer": "basic", "objects": objects})
            self._send(404, {"error": f"fake hub: no route POST {path}"})

        def do_PUT(self) -> None:
            body = self._record()
            oid = self.path.rsplit("/", 1)[-1]
            if hub.fail_lfs_upload:
                return self._send(403, {"error": "fake hub: storage refused the upload"})
            if hashlib.sha256(body).hexdigest() != oid:
                return self._send(400, {"error": "sha256 mismatch"})
            hub.lfs_blobs[oid] = body
            self._send(200, {})

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    fake = FakeHub()
    fake.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def make_child(root: Path, *, scorecard: dict | None = SCORECARD) -> Path:
    """A child folder as `merge run` writes it, with small stand-in weights."""
    import torch
    from safetensors.torch import save_file

    from merger.core.recipe import parse_recipe
    from merger.share.card import write_model_card

    child = root / "geitje-slerp"
    child.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(
        {"model.embed_tokens.weight": torch.randn(16, 8), "lm_head.weight": torch.randn(16, 8)},
        str(child / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (child / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 16}))
    (child / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    (child / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (child / "mergekit_config.yml").write_text(RECIPE)
    (child / "kruising_provenance.json").write_text(json.dumps({"inputs": []}))
    write_model_card(child, RECIPE, parse_recipe(RECIPE))
    if scorecard is not None:
        (child / "scorecard.json").write_text(json.dumps(scorecard))
    (child / ".lock").write_text("editor droppings are not uploaded")
    return child


def _no_token_in(hub: FakeHub) -> None:
    """The token travels only in Authorization headers: never in a body or an uploaded file."""
    for request in hub.requests:
        assert TOKEN.encode() not in request.body, request.path
        assert TOKEN not in request.path
        others = {k: v for k, v in request.headers.items() if k != "authorization"}
        assert TOKEN not in json.dumps(others)
    for repo in hub.repos.values():
        for name, content in repo.files.items():
            assert TOKEN.encode() not in content, name


# --------------------------------------------------------------------------------------------
# push
# --------------------------------------------------------------------------------------------


def test_push_creates_repo_and_uploads_the_child_in_one_commit(hub, tmp_path, capsys):
    from merger.share.hub import push

    child = make_child(tmp_path)
    url = push(child, "org/geitje-slerp", private=True)

    assert url == f"{hub.url}/org/geitje-slerp"
    repo = hub.repos[("model", "org/geitje-slerp")]
    assert repo.private is True
    assert len(repo.commits) == 1 and len(hub.calls(r"POST /api/models/.*/commit/main")) == 1
    expected = {
        p.relative_to(child).as_posix()
        for p in child.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }
    assert set(repo.files) == expected
    for name in expected - {"README.md"}:
        assert repo.files[name] == (child / name).read_bytes(), name
    assert repo.files["mergekit_config.yml"].decode() == RECIPE

    # The uploaded card is the child's card refreshed with the scorecard and the repo id.
    from huggingface_hub import ModelCard

    card = ModelCard(repo.files["README.md"].decode())
    assert card.data.base_model == ["mistralai/Mistral-7B-v0.1", "Rijgersberg/GEITje-7B"]
    assert "dutch" in card.data.tags and card.data.language == ["nl", "en"]
    metrics = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics[("nl", "dutch_score")] == 0.61 and metrics[("cultuur", "acc_norm")] == 0.47
    assert "merge pull org/geitje-slerp --out recipe.yaml" in card.text
    assert "<org>/<name>" in (child / "README.md").read_text()  # the local card is untouched

    whoami = hub.calls(r"GET /api/whoami-v2")
    assert len(whoami) == 1 and whoami[0].headers["authorization"] == f"Bearer {TOKEN}"
    _no_token_in(hub)
    assert TOKEN not in capsys.readouterr().err


# huggingface_hub's own LFS PUT passes bytes as data=; httpx2 warns about it, not about us.
_LFS_PUT_WARNING = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def lfs_hub(hub, monkeypatch):
    """The fake Hub putting weights on LFS, with Xet off so the client takes the LFS protocol."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_suffixes = (".safetensors",)
    return hub


@_LFS_PUT_WARNING
def test_push_sends_weights_through_lfs_then_commits_once(lfs_hub, tmp_path):
    from merger.share.hub import push

    child = make_child(tmp_path)
    push(child, "org/geitje-slerp")

    repo = lfs_hub.repos[("model", "org/geitje-slerp")]
    weights = (child / "model.safetensors").read_bytes()
    assert repo.files["model.safetensors"] == weights
    assert list(lfs_hub.lfs_blobs.values()) == [weights]
    assert len(lfs_hub.calls(r"PUT /lfs-upload/")) == 1 and len(repo.commits) == 1
    _no_token_in(lfs_hub)


@_LFS_PUT_WARNING
def test_failed_weight_upload_commits_nothing(lfs_hub, tmp_path):
    from merger.share.hub import push

    lfs_hub.fail_lfs_upload = True
    with pytest.raises(KruisingError, match="nothing was committed, the new repo is empty"):
        push(make_child(tmp_path), "org/geitje-slerp")
    assert not lfs_hub.calls(r"POST .*/commit/")
    assert lfs_hub.repos[("model", "org/geitje-slerp")].files == {}


def test_push_recipe_only_uploads_card_recipe_and_scorecard(hub, tmp_path):
    from merger.share.hub import push

    child = make_child(tmp_path)
    push(child, "geitje-slerp", recipe_only=True)  # bare name: the token's user namespace

    repo = hub.repos[("model", f"{USER}/geitje-slerp")]
    assert repo.private is False
    assert set(repo.files) == {"README.md", "mergekit_config.yml", "scorecard.json"}
    assert json.loads(repo.files["scorecard.json"]) == SCORECARD
    _no_token_in(hub)


def test_push_into_existing_repo_adds_a_commit(hub, tmp_path):
    from merger.share.hub import push

    hub.add_repo("org/geitje-slerp", **{"old.txt": b"kept"})
    push(make_child(tmp_path), "https://huggingface.co/org/geitje-slerp", recipe_only=True)

    repo = hub.repos[("model", "org/geitje-slerp")]
    assert not hub.calls(r"POST /api/repos/create")
    assert repo.files["old.txt"] == b"kept" and "mergekit_config.yml" in repo.files
    assert len(repo.commits) == 2


def test_push_without_token_says_how_to_log_in(hub, tmp_path, monkeypatch):
    from merger.share.hub import push

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(KruisingError, match="no Hugging Face token") as info:
        push(make_child(tmp_path), "org/geitje-slerp")
    assert "hf auth login" in info.value.hint and "huggingface-cli login" in info.value.hint
    assert hub.requests == []


def test_push_with_rejected_token(hub, tmp_path, monkeypatch):
    from merger.share.hub import push

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(KruisingError, match=r"rejected your Hugging Face token \(401\)") as info:
        push(make_child(tmp_path), "org/geitje-slerp")
    assert "hf auth login" in info.value.hint
    assert not hub.calls("POST")


@pytest.mark.parametrize("kind", ["dataset", "space"])
def test_push_to_a_name_that_is_a_dataset_or_space(hub, tmp_path, kind):
    from merger.share.hub import push

    hub.add_repo("org/geitje-slerp", kind, **{"README.md": b"---\n---\n"})
    with pytest.raises(KruisingError, match=f"exists on the Hub as a {kind}, not a model repo"):
        push(make_child(tmp_path), "org/geitje-slerp")
    assert not hub.calls("POST /api/repos/create") and not hub.calls("commit")
    assert ("model", "org/geitje-slerp") not in hub.repos


@pytest.mark.parametrize("repo", ["datasets/org/x", "https://huggingface.co/spaces/org/x"])
def test_push_refuses_dataset_and_space_urls(hub, tmp_path, repo):
    from merger.share.hub import push

    with pytest.raises(KruisingError, match="works with model repos"):
        push(make_child(tmp_path), repo)
    assert hub.requests == []


def test_failed_commit_is_not_claimed_as_done(hub, tmp_path, capsys, monkeypatch):
    from merger import cli

    hub.fail_commit = True
    child = make_child(tmp_path)
    monkeypatch.setattr(sys, "argv", ["merge", "push", str(child), "--repo", "org/geitje-slerp"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    out = capsys.readouterr()
    assert out.out == ""  # no URL printed
    assert "upload to org/geitje-slerp failed (500): nothing was committed" in out.err
    assert "new repo is empty" in out.err and "hint:" in out.err
    assert "pushed" not in out.err and TOKEN not in out.err
    assert hub.repos[("model", "org/geitje-slerp")].files == {}


def test_incomplete_child_is_refused_before_any_upload(hub, tmp_path):
    from merger.share.hub import push

    child = make_child(tmp_path)
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (child / "model.safetensors").rename(child / "model-00001-of-00002.safetensors")
    (child / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KruisingError, match="missing model-00002-of-00002.safetensors"):
        push(child, "org/geitje-slerp")
    assert not hub.calls("POST")


def test_push_refuses_a_file_holding_the_token(hub, tmp_path):
    from merger.share.hub import push

    child = make_child(tmp_path)
    (child / "notes.txt").write_text(f"export HF_TOKEN={TOKEN}\n")
    with pytest.raises(KruisingError, match="notes.txt contains your Hugging Face token") as info:
        push(child, "org/geitje-slerp")
    assert TOKEN not in str(info.value) + info.value.hint
    assert not hub.calls("POST")


def test_private_flag_on_an_existing_public_repo_is_an_error(hub, tmp_path):
    from merger.share.hub import push

    hub.add_repo("org/geitje-slerp")
    with pytest.raises(KruisingError, match="exists and is public; --private cannot"):
        push(make_child(tmp_path), "org/geitje-slerp", private=True)
    assert not hub.calls("commit")


def test_push_to_an_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    from merger.share.hub import push

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    start = time.monotonic()
    with pytest.raises(KruisingError, match="cannot reach the Hub at http://127.0.0.1"):
        push(make_child(tmp_path), "org/geitje-slerp")
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------

# A card as mergekit 0.1.x writes it (mergekit/card.py's template).
MERGEKIT_CARD = """\
---
base_model:
- mistralai/Mistral-7B-v0.1
- BramVanroy/GEITje-7B-ultra
library_name: transformers
tags:
- mergekit
- merge

---
# merged

This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).

## Merge Details
### Merge Method

This model was merged using the [TIES](https://arxiv.org/abs/2306.01708) merge method using [mistralai/Mistral-7B-v0.1](https://huggingface.co/mistralai/Mistral-7B-v0.1) as a base.

### Models Merged

The following models were included in the merge:
* [BramVanroy/GEITje-7B-ultra](https://huggingface.co/BramVanroy/GEITje-7B-ultra)
* [mistralai/Mistral-7B-Instruct-v0.2](https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2)

### Configuration

The following YAML configuration was used to produce this model:

```yaml
models:
  - model: BramVanroy/GEITje-7B-ultra
    parameters:
      density: 0.53
      weight: 0.6
  - model: mistralai/Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.53
      weight: 0.4
merge_method: ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16

```
"""

# A card as LazyMergekit's notebook writes it: emoji headings, a python usage block after.
LAZYMERGEKIT_CARD = """\
---
license: apache-2.0
tags:
- merge
- mergekit
- lazymergekit
- Rijgersberg/GEITje-7B-chat-v2
- mistralai/Mistral-7B-Instruct-v0.2
base_model:
- Rijgersberg/GEITje-7B-chat-v2
- mistralai/Mistral-7B-Instruct-v0.2
---

# GEITje-Instruct-slerp

GEITje-Instruct-slerp is a merge of the following models using [LazyMergekit](https://colab.research.google.com/drive/1obulZ1ROXHjYLn6PPZJwRR6GzgQogxxb?usp=sharing):
* [Rijgersberg/GEITje-7B-chat-v2](https://huggingface.co/Rijgersberg/GEITje-7B-chat-v2)
* [mistralai/Mistral-7B-Instruct-v0.2](https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.2)

## 🧩 Configuration

```yaml
slices:
  - sources:
      - model: Rijgersberg/GEITje-7B-chat-v2
        layer_range: [0, 32]
      - model: mistralai/Mistral-7B-Instruct-v0.2
        layer_range: [0, 32]
merge_method: slerp
base_model: Rijgersberg/GEITje-7B-chat-v2
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
```

## 💻 Usage

```python
!pip install -qU transformers accelerate

from transformers import AutoTokenizer
import transformers
import torch

model = "someone/GEITje-Instruct-slerp"
messages = [{"role": "user", "content": "Wat is een grote taalmodel?"}]
```
"""


def _block(card: str, opener: str) -> str:
    start = card.index(opener) + len(opener)
    return card[start : card.index("\n```", start) + 1]


@pytest.mark.parametrize(
    "card, opener",
    [(MERGEKIT_CARD, "```yaml\n"), (LAZYMERGEKIT_CARD, "## 🧩 Configuration\n\n```yaml\n")],
    ids=["mergekit", "lazymergekit"],
)
def test_pull_from_a_card_writes_its_yaml_block(tmp_path, card, opener):
    from merger.core.recipe import load_recipe
    from merger.share.hub import pull

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text(card, encoding="utf-8")
    out = pull(str(repo), tmp_path / "recipe.yaml")

    assert out.read_text(encoding="utf-8") == _block(card, opener)
    recipe = load_recipe(out)
    assert recipe.merge_method in {"ties", "slerp"} and len(recipe.referenced_models()) >= 2


def test_pull_prefers_mergekit_config_over_the_card(tmp_path):
    from merger.share.hub import pull

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text(MERGEKIT_CARD)
    (repo / "mergekit_config.yml").write_text(RECIPE)
    assert pull(str(repo), tmp_path / "r.yaml").read_text() == RECIPE


def test_pull_card_without_recipe(tmp_path):
    from merger.share.hub import pull

    card = tmp_path / "repo" / "README.md"
    card.parent.mkdir()
    card.write_text("---\nlicense: mit\n---\n# A model\n\n```python\nprint('hoi')\n```\n")
    with pytest.raises(KruisingError, match=r"no merge recipe in .*README.md: it has no ```yaml"):
        pull(str(card.parent), tmp_path / "r.yaml")
    assert not (tmp_path / "r.yaml").exists()


def test_pull_card_with_an_invalid_recipe_names_the_line_in_the_card(tmp_path):
    from merger.share.hub import pull

    card = LAZYMERGEKIT_CARD.replace("    - value: 0.5\n", "    - value: 0.5\n  densty: 0.5\n")
    line = card.splitlines().index("  densty: 0.5") + 1
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text(card, encoding="utf-8")
    with pytest.raises(KruisingError, match=rf"README.md:{line}: .*densty"):
        pull(str(repo), tmp_path / "r.yaml")
    assert not (tmp_path / "r.yaml").exists()


def test_pull_does_not_clobber_a_different_recipe(tmp_path):
    from merger.share.hub import pull

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "mergekit_config.yml").write_text(RECIPE)
    out = tmp_path / "r.yaml"
    out.write_text("merge_method: linear\n")
    with pytest.raises(KruisingError, match="exists and holds a different recipe"):
        pull(str(repo), out)
    assert pull(str(repo), out, overwrite=True).read_text() == RECIPE
    assert pull(str(repo), out).read_text() == RECIPE  # same content: fine


def test_push_then_pull_from_the_hub(hub, tmp_path):
    from merger.share.hub import pull, push

    push(make_child(tmp_path), "org/geitje-slerp", recipe_only=True)
    out = pull("org/geitje-slerp", tmp_path / "pulled.yaml")
    assert out.read_text() == RECIPE
    assert hub.calls(r"GET /org/geitje-slerp/resolve/[0-9a-f]+/mergekit_config.yml")


def test_pull_from_a_hub_card_uses_its_yaml(hub, tmp_path):
    from merger.share.hub import pull

    hub.add_repo("someone/GEITje-Instruct-slerp", **{"README.md": LAZYMERGEKIT_CARD.encode()})
    out = pull("someone/GEITje-Instruct-slerp", tmp_path / "r.yaml")
    assert out.read_text() == _block(LAZYMERGEKIT_CARD, "## 🧩 Configuration\n\n```yaml\n")


@pytest.mark.parametrize("kind", ["dataset", "space"])
def test_pull_from_a_dataset_or_space(hub, tmp_path, kind):
    from merger.share.hub import pull

    hub.add_repo("org/geitje-data", kind, **{"README.md": MERGEKIT_CARD.encode()})
    with pytest.raises(KruisingError, match=f"org/geitje-data is a {kind} on the Hub, not a model"):
        pull("org/geitje-data", tmp_path / "r.yaml")


def test_pull_missing_repo(hub, tmp_path):
    from merger.share.hub import pull

    with pytest.raises(KruisingError, match="model repo org/nope not found on the Hub"):
        pull("org/nope", tmp_path / "r.yaml")


def test_pull_offline_fails_at_once_naming_the_repo(hub, tmp_path, monkeypatch):
    from merger.share.hub import pull

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(KruisingError, match="HF_HUB_OFFLINE is set and org/geitje-slerp is not"):
        pull("org/geitje-slerp", tmp_path / "r.yaml")
    assert time.monotonic() - start < 5
    assert hub.requests == []


def test_pull_from_an_unreachable_hub_fails_fast(tmp_path, monkeypatch):
    from merger.share.hub import pull

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    with pytest.raises(KruisingError, match="cannot reach the Hub at .* for org/geitje-slerp"):
        pull("org/geitje-slerp", tmp_path / "r.yaml")
    assert time.monotonic() - start < 5


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# merge pull → merge run reproduces the child, tensor for tensor
# --------------------------------------------------------------------------------------------


def _engine_or_skip():
    try:
        from merger.core.engine import run_recipe_file
    except ImportError as exc:
        pytest.skip(f"needs merger.core.engine.run_recipe_file (issue 2, not landed yet): {exc}")
    return run_recipe_file


def test_merge_pull_then_merge_run_reproduces_the_child(make_tiny_mistral, tmp_path, monkeypatch):
    run_recipe_file = _engine_or_skip()
    import torch

    from merger import cli
    from merger.core.options import MergeOptions

    base = make_tiny_mistral("hub-base", seed=1)
    nl = make_tiny_mistral("hub-nl", seed=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "# tiny GEITje-style slerp\n"
        f"merge_method: slerp\nbase_model: {base}\n"
        f"slices:\n  - sources:\n      - model: {base}\n        layer_range: [0, 4]\n"
        f"      - model: {nl}\n        layer_range: [0, 4]\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 1]\n"
        "    - value: 0.3\ndtype: float32\n"
    )
    child = tmp_path / "child"
    run_recipe_file(recipe, child, MergeOptions(device="cpu"))
    assert (child / "README.md").is_file() and (child / "mergekit_config.yml").is_file()

    stand_in = tmp_path / "org--tiny-slerp"  # a downloaded copy of the repo: card only
    stand_in.mkdir()
    shutil.copy(child / "README.md", stand_in / "README.md")

    pulled = tmp_path / "pulled.yaml"
    monkeypatch.setattr(sys, "argv", ["merge", "pull", str(stand_in), "--out", str(pulled)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None)
    assert pulled.read_text() == recipe.read_text()

    again = tmp_path / "again"
    monkeypatch.setattr(
        sys, "argv", ["merge", "run", str(pulled), "--out", str(again), "--device", "cpu"]
    )
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code in (0, None)

    first, second = load_tensors(child), load_tensors(again)
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), name
