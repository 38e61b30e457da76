"""Scoring speed: ``python -m eval.bench MODEL [--suite nl] [--device auto] [--batch-size 16]``.

MODEL is a checkpoint folder, or ``random:SHAPE`` (``tiny``, ``1b``, ``7b``: a randomly initialised
MistralForCausalLM of that shape, built on the device, with ``--tokenizer DIR``) to time a 7B-sized
forward pass without its weights. Prints the derived numbers first, then the time and items/s.
"""

from __future__ import annotations

import argparse
import json
import time

SHAPES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4),
    "1b": dict(
        hidden_size=2048, intermediate_size=7168, num_hidden_layers=16, num_attention_heads=16
    ),
    "7b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32
    ),
}


def random_mistral(shape: str, device):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    settings = dict(SHAPES[shape], num_key_value_heads=8 if shape != "tiny" else 2)
    config = MistralConfig(vocab_size=32000, max_position_embeddings=4096, **settings)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).to(dtype)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--suite", default="nl")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokenizer", help="tokenizer folder for random:SHAPE models")
    parser.add_argument("--repeat", type=int, default=2, help="runs; the first warms up")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from eval.api import load_model, score_model
    from kruising.device import resolve_device

    start = time.perf_counter()
    if args.model.startswith("random:"):
        device = resolve_device(args.device)
        model = random_mistral(args.model.split(":", 1)[1], device)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        model, tokenizer, device = load_model(args.model, args.device)
    params = sum(p.numel() for p in model.parameters())
    dtype = next(model.parameters()).dtype
    print(
        f"model {args.model}: {params / 1e6:.1f} M parameters, {dtype}, device {device}, "
        f"suite {args.suite}, batch size {args.batch_size}, loaded in {time.perf_counter() - start:.1f} s"
    )
    card = None
    for run in range(args.repeat):
        card = score_model(
            model, tokenizer, args.suite, name=args.model, batch_size=args.batch_size
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(
            f"run {run + 1}: {card['items']} items in {card['seconds']:.2f} s = "
            f"{card['items_per_second']} items/s"
        )
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    assert card is not None
    summary = {k: v for k, v in card.items() if k not in ("weights",)}
    for probe in summary["probes"].values():
        probe.pop("examples", None)
    print(json.dumps(summary, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
