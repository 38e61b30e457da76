"""The real Mistral-7B-v0.1 tokenizer, as shipped inside the `mistral-common` package.

`AutoTokenizer.from_pretrained` on a folder holding it as `tokenizer.model` gives ids that
match sentencepiece exactly (transformers 5's `LlamaTokenizer(vocab_file=...)` does not).
"""

from __future__ import annotations

from pathlib import Path

from kruising.atomic import write_bytes
from pretrain.errors import PretrainError

MISTRAL_VOCAB_SIZE = 32000


def mistral_tokenizer_model() -> Path:
    """Path of the sentencepiece model of Mistral-7B-v0.1 inside `mistral-common`."""
    try:
        import mistral_common
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise PretrainError(
            "the mistral-common package is not installed", "pip install mistral-common"
        ) from exc
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise PretrainError(
            f"mistral-common has no {path.name} at {path}",
            "install a mistral-common release that ships data/tokenizer.model.v1",
        )
    return path


def load_mistral_tokenizer(cache_dir: Path):
    """Load the Mistral-7B-v0.1 tokenizer (a transformers fast tokenizer) via `cache_dir`."""
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    model_file = cache_dir / "tokenizer.model"
    shipped = mistral_tokenizer_model().read_bytes()
    if not model_file.is_file() or model_file.read_bytes() != shipped:
        write_bytes(model_file, shipped)  # atomic: concurrent first runs share the cache
    return AutoTokenizer.from_pretrained(str(cache_dir))
