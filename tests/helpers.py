"""Small helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def load_tensors(folder: Path) -> dict:
    """Every tensor of a checkpoint folder, from all its safetensors shards."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


MINI_CLOZE = [
    {
        "id": "1",
        "context": "De hoofdstad van Nederland is",
        "choices": ["Amsterdam", "Utrecht"],
        "answer": 0,
    },
    {
        "id": "2",
        "context": "De ACM is de",
        "choices": ["Autoriteit Consument en Markt", "Algemene Commissie Media"],
        "answer": 0,
    },
]


def write_mini_suite(folder: Path, text_probe: str, text: str) -> Path:
    """A two-item Dutch cloze probe (`kennis.jsonl`) plus one perplexity text probe."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "kennis.jsonl").write_text("\n".join(json.dumps(i) for i in MINI_CLOZE) + "\n")
    (folder / f"{text_probe}.jsonl").write_text(json.dumps({"id": "1", "text": text}) + "\n")
    return folder


def run_mergekit(text: str, out: Path, **options) -> Path:
    """Merge recipe YAML with mergekit 0.1.5's Python API (in-process, CPU) into ``out``."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=MergeOptions(device="cpu", quiet=True, **options))
    return out
