"""`merge moe RECIPE --out DIR`: a Mixtral-style mixture of experts from Mistral fine-tunes.

The recipe is mergekit-moe's YAML (mergekit 0.1.5): ``base_model``, ``experts`` (each a
``source_model`` with ``positive_prompts`` / ``negative_prompts``, ``noise_scale``,
``residual_scale``), ``gate_mode``, ``dtype``, ``experts_per_token``. The child is what
mergekit-moe writes for the Mixtral output architecture:

- every tensor outside the MLPs (embeddings, attention, norms, head) from the base model;
- per layer, the experts' MLPs stacked in transformers' fused layout:
  ``mlp.experts.gate_up_proj`` (experts x 2*intermediate x hidden: gate_proj then up_proj) and
  ``mlp.experts.down_proj`` (experts x hidden x intermediate);
- per layer, the router ``mlp.gate.weight`` (experts x hidden), from the gate mode:
  ``hidden`` / ``hidden_last`` (the base model's hidden state of each prompt's last token, in
  bf16, averaged over the prompts, one vector per layer), ``hidden_avg`` (averaged over the
  tokens too), ``cheap_embed`` (the prompts' summed token embeddings, the same for every
  layer), ``random`` (standard normal) or ``uniform_random`` (torch.nn.Linear's init); negative
  prompts are subtracted and each vector is normalised, as in mergekit;
- a MixtralConfig built from the base config, the base tokenizer with left padding and
  ``<s>`` as the pad token (as mergekit-moe saves it), the recipe as ``mergekit_moe_config.yml``
  and a model card. The folder is built in a hidden sibling and renamed into place.

Random numbers (``random`` gates, ``noise_scale``) come from one generator seeded by
``--seed``, drawn in mergekit's order, so ``mergekit-moe --random-seed N`` and ``--seed N``
make the same child.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError

from kruising.config import Problem, Strict, compose_yaml, format_loc, line_of
from kruising.console import console
from kruising.errors import KruisingError
from merger.core import output

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
#: the source MLP weights of an expert, in mergekit's order (w1, w2, w3 of Mixtral)
EXPERT_WEIGHTS = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))


def _model_ref(value: Any) -> str:
    from merger.core.recipe import parse_model_ref

    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a model reference is a local folder or a Hub id, got {value!r}")
    try:
        parse_model_ref(value)
    except KruisingError as exc:
        raise ValueError(exc.message) from None
    return value


ModelRef = Annotated[str, BeforeValidator(_model_ref)]


class Expert(Strict):
    """One expert: a model whose MLPs become one expert per layer."""

    source_model: ModelRef
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoERecipe(Strict):
    """mergekit-moe's configuration (``MoEMergeConfig``), parsed strictly."""

    base_model: ModelRef
    experts: list[Expert] = Field(min_length=1)
    gate_mode: Literal[GATE_MODES] = "hidden"  # type: ignore[valid-type]
    dtype: Literal["float32", "float16", "bfloat16", "float64"] | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None


def parse_moe_recipe(text: str, source: str = "<moe recipe>") -> MoERecipe:
    """Parse mergekit-moe YAML; one KruisingError lists every problem with its line."""
    data, lines, problems = compose_yaml(text, source)
    if data is not None and not isinstance(data, dict):
        problems.append(Problem(source=source, line=1, path="", message="not a mapping of keys"))
    recipe = None
    if not problems:
        try:
            recipe = MoERecipe.model_validate(data)
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
                if err["type"] == "literal_error":
                    message = f"{message}, got {err.get('input')!r}"
                problems.append(
                    Problem(
                        source=source,
                        line=line_of(loc, lines),
                        path=format_loc(loc),
                        message=message[:1].lower() + message[1:],
                    )
                )
    if recipe is not None:
        problems += _semantic_problems(recipe, source, lines)
    if problems:
        raise KruisingError(
            "\n".join(str(p) for p in problems),
            "\n".join(dict.fromkeys(p.hint for p in problems if p.hint))
            or "a mergekit-moe recipe has base_model, experts (source_model, positive_prompts), "
            "gate_mode, dtype, experts_per_token",
        )
    return recipe


def _semantic_problems(recipe: MoERecipe, source: str, lines) -> list[Problem]:
    """mergekit-moe's `is_bad_config` and Mixtral's `supports_config`, with lines."""

    def problem(loc, message, hint=""):
        return Problem(
            source=source,
            line=line_of(loc, lines),
            path=format_loc(loc),
            message=message,
            hint=hint,
        )

    out = []
    if recipe.experts_per_token < 1:
        out.append(problem(("experts_per_token",), "must be at least 1", "e.g. 2"))
    elif len(recipe.experts) < recipe.experts_per_token:
        out.append(
            problem(
                ("experts",),
                f"{len(recipe.experts)} experts for experts_per_token {recipe.experts_per_token}",
                "give at least as many experts as experts_per_token",
            )
        )
    if recipe.shared_experts:
        out.append(
            problem(
                ("shared_experts",),
                "the Mixtral output has no shared experts",
                "remove shared_experts (mergekit writes DeepSeek/Qwen MoEs for them)",
            )
        )
    if recipe.architecture and not "mixtral".startswith(recipe.architecture.lower()):
        out.append(
            problem(
                ("architecture",),
                f"output architecture {recipe.architecture!r}: only Mixtral is supported",
                "remove architecture: or write architecture: mixtral",
            )
        )
    if recipe.gate_mode != "random":  # mergekit: every other mode needs prompts
        for i, expert in enumerate(recipe.experts):
            if not expert.positive_prompts:
                out.append(
                    problem(
                        ("experts", i),
                        "no positive_prompts",
                        f"gate_mode {recipe.gate_mode} routes by prompts: give each expert "
                        "positive_prompts (or use gate_mode: random)",
                    )
                )
        prompts = {
            (tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ()))
            for e in recipe.experts
        }
        if len(recipe.experts) > 1 and len(prompts) == 1 and not out:
            out.append(
                problem(
                    ("experts",),
                    "every expert has the same prompts: the router could not tell them apart",
                    "give each expert prompts for what should be routed to it",
                )
            )
    return out


def load_moe_recipe(path: Path) -> tuple[MoERecipe, str]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KruisingError(f"MoE recipe not found: {path}", "check the path") from None
    return parse_moe_recipe(text, str(path)), text


# --- the router ---------------------------------------------------------------------------


def _tokenize(tokenizer, prompts: list[str]):
    return tokenizer(
        [(tokenizer.bos_token or "") + p for p in prompts],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )


def cheap_embedding(embed, tokenized, num_layers: int):
    """The prompts' token embeddings (float32) summed over tokens and prompts, normalised,
    one copy per layer (mergekit's ``get_cheap_embedding``, without its one-hot matmul)."""
    h = embed.float()[tokenized["input_ids"]]  # (batch, seq, hidden)
    summed = (h * tokenized["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    res = summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return res.repeat(num_layers, 1)


def hidden_states(model, tokenized, average: bool):
    """The base model's hidden state per layer (embeddings + all but the last layer): each
    prompt's last token (or the mean over tokens), averaged over the prompts."""
    import torch

    with torch.no_grad():
        output = model(**tokenized.to(model.device), output_hidden_states=True, return_dict=True)
    states = torch.stack(output.hidden_states[:-1])  # (layers, batch, seq, hidden)
    if average:
        states = states.sum(dim=2) / states.shape[2]
    else:
        states = states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def gate_vectors(recipe: MoERecipe, base_path: Path, config: dict, tokenizer, device, generator):
    """The router weights, (layers, experts, hidden), as mergekit-moe's ``get_gate_params``."""
    import torch

    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    experts = recipe.experts
    if recipe.gate_mode == "random":
        return torch.randn((layers, len(experts), hidden), generator=generator)
    if recipe.gate_mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        shape = (layers, len(experts), hidden)
        return torch.rand(shape, generator=generator) * 2 * scale - scale
    if recipe.gate_mode == "cheap_embed":
        from merger.core.io import open_model

        source = open_model(str(base_path))
        embed = source.read("model.embed_tokens.weight").clone()
        source.close()

        def vector(tokenized):
            return cheap_embedding(embed, tokenized, layers)

    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch.bfloat16, low_cpu_mem_usage=True
        ).to(device)
        model.eval()

        def vector(tokenized):
            return hidden_states(model, tokenized, average=recipe.gate_mode == "hidden_avg")

    vectors = []
    for expert in experts:
        states = vector(_tokenize(tokenizer, expert.positive_prompts))
        if expert.negative_prompts:
            states -= vector(_tokenize(tokenizer, expert.negative_prompts))
        states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        vectors.append(states)
    return torch.stack(vectors, dim=0).permute(1, 0, 2).cpu()


# --- the child -----------------------------------------------------------------------------


def _out_dtype(recipe: MoERecipe, config: dict):
    import torch

    from merger.core.plan import parse_dtype

    if recipe.dtype:
        return parse_dtype(recipe.dtype, "dtype")
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, str(name).removeprefix("torch."), None) if name else None


def mixtral_config(base_config: dict, num_experts: int, experts_per_token: int, dtype) -> Any:
    """mergekit-moe's Mixtral config: the base config's fields, Mixtral's architecture."""
    import transformers

    base = transformers.MistralConfig(**base_config)
    out = transformers.MixtralConfig(**base.to_dict())
    out.architectures = ["MixtralForCausalLM"]
    out.num_local_experts = num_experts
    out.num_experts_per_tok = experts_per_token or 2
    out.sliding_window = None
    out.dtype = dtype
    return out


def build_moe(
    recipe: MoERecipe,
    out: Path,
    *,
    recipe_text: str | None = None,
    device: str = "auto",
    seed: int = 0,
    allow_all_same: bool = False,
    overwrite: bool = False,
    out_shard_size: str = "5GB",
) -> Path:
    """Write the MoE child of ``recipe`` into ``out``; returns the folder."""
    import torch
    from transformers import AutoTokenizer

    from kruising.device import resolve_device
    from merger.core.io import ShardWriter, open_model, parse_size

    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise KruisingError(
            f"output folder {out} already exists", "choose another --out, or pass --overwrite"
        )
    torch_device = resolve_device(device, error=KruisingError)
    refs = list(dict.fromkeys([recipe.base_model, *(e.source_model for e in recipe.experts)]))
    if not allow_all_same and len(recipe.experts) > 1:
        if len({e.source_model for e in recipe.experts}) == 1:
            raise KruisingError(
                "every expert is the same model: the MoE would compute what that model does, "
                "at several times the cost",
                "use different fine-tunes as experts (or pass --allow-all-same to build it "
                "anyway, e.g. to train it further)",
            )
    sources = {ref: open_model(ref) for ref in refs}
    base = sources[recipe.base_model]
    try:
        types = {ref: s.config.get("model_type") for ref, s in sources.items()}
        if len(set(types.values())) != 1 or next(iter(types.values())) not in ("mistral", "llama"):
            raise KruisingError(
                "the Mixtral output needs the base and every expert to be the same Mistral or "
                f"Llama architecture; got {', '.join(f'{r}: {t}' for r, t in types.items())}",
                "use Mistral-family fine-tunes of one base",
            )
        layers = int(base.config["num_hidden_layers"])
        out_dtype = _out_dtype(recipe, base.config)
        console.print(
            f"moe: {len(recipe.experts)} experts ({recipe.experts_per_token} per token), "
            f"{layers} layers, gate_mode {recipe.gate_mode}, device {torch_device}, "
            f"out {str(out_dtype).removeprefix('torch.')}"
        )
        tokenizer = AutoTokenizer.from_pretrained(base.path)
        tokenizer.padding_side = "left"
        tokenizer.pad_token_id = tokenizer.bos_token_id
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        generator = torch.Generator().manual_seed(seed)
        gates = gate_vectors(recipe, base.path, base.config, tokenizer, torch_device, generator)

        def cast(t):
            return t.to(dtype=out_dtype) if out_dtype is not None else t

        outside = [n for n in base.tensors if ".mlp." not in n]
        layout = [(n, out_dtype or base.tensors[n].dtype, base.tensors[n].shape) for n in outside]
        experts = len(recipe.experts)
        for i in range(layers):
            gate_up = base.tensors[f"model.layers.{i}.mlp.gate_proj.weight"]
            down = base.tensors[f"model.layers.{i}.mlp.down_proj.weight"]
            dt = out_dtype or gate_up.dtype
            prefix = f"model.layers.{i}.mlp"
            layout.append(
                (
                    f"{prefix}.experts.gate_up_proj",
                    dt,
                    (experts, 2 * gate_up.shape[0], gate_up.shape[1]),
                )
            )
            layout.append((f"{prefix}.experts.down_proj", dt, (experts, *down.shape)))
        for i in range(layers):
            gate = (
                f"model.layers.{i}.mlp.gate.weight",
                out_dtype or gates.dtype,
                tuple(gates[i].shape),
            )
            layout.append(gate)
        layout.sort(key=lambda entry: entry[0])
        tmp = output.prepare(
            out, overwrite=overwrite, inputs=[s.path for s in sources.values()], what="MoE child"
        )
        try:
            writer = ShardWriter(tmp, layout, parse_size(out_shard_size))
            try:
                for name in outside:
                    writer.write(name, cast(base.read(name)))
                for i in range(layers):
                    prefix = f"model.layers.{i}.mlp"
                    gate_proj, down_proj, up_proj = [], [], []
                    for expert in recipe.experts:
                        source = sources[expert.source_model]
                        for param, _ in EXPERT_WEIGHTS:
                            tensor = source.read(f"{prefix}.{param}.weight")
                            if expert.noise_scale is not None:
                                noise = torch.randn(
                                    tensor.shape, generator=generator, dtype=tensor.dtype
                                )
                                tensor = tensor + noise * expert.noise_scale
                            if param == "down_proj" and expert.residual_scale is not None:
                                tensor = tensor * expert.residual_scale
                            {"gate_proj": gate_proj, "down_proj": down_proj, "up_proj": up_proj}[
                                param
                            ].append(tensor)
                    fused = torch.cat([torch.stack(gate_proj), torch.stack(up_proj)], dim=1)
                    writer.write(f"{prefix}.experts.gate_up_proj", cast(fused).contiguous())
                    writer.write(f"{prefix}.experts.down_proj", cast(torch.stack(down_proj)))
                    for ref in {e.source_model for e in recipe.experts}:
                        for param, _ in EXPERT_WEIGHTS:
                            sources[ref].release(f"{prefix}.{param}.weight")
                for i in range(layers):
                    writer.write(f"model.layers.{i}.mlp.gate.weight", cast(gates[i]).contiguous())
            except BaseException:
                writer.abort()
                raise
            writer.finish()
            mixtral_config(
                base.config, experts, recipe.experts_per_token, out_dtype
            ).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            generation = base.path / "generation_config.json"
            if generation.is_file():
                shutil.copyfile(generation, tmp / "generation_config.json")
            text = (
                recipe_text
                if recipe_text is not None
                else yaml.safe_dump(recipe.model_dump(exclude_none=True), sort_keys=False)
            )
            (tmp / "mergekit_moe_config.yml").write_text(text)
            (tmp / "README.md").write_text(_card(recipe, text))
            output.commit(tmp, out, overwrite=overwrite, what="MoE child")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        for source in sources.values():
            source.close()
    console.print(f"wrote {out} (MixtralForCausalLM, {experts} experts)")
    return out


def _card(recipe: MoERecipe, text: str) -> str:
    models = list(dict.fromkeys([recipe.base_model, *(e.source_model for e in recipe.experts)]))
    front = yaml.safe_dump(
        {
            "base_model": models,
            "library_name": "transformers",
            "tags": ["merge", "mergekit", "kruising", "moe"],
        },
        sort_keys=False,
    )
    experts = "\n".join(f"- `{e.source_model}`" for e in recipe.experts)
    return (
        f"---\n{front}---\n\n# Mixture of experts\n\n"
        f"A MixtralForCausalLM built with `merge moe` (kruising) from `{recipe.base_model}` "
        f"(attention, embeddings, norms) and {len(recipe.experts)} experts "
        f"(their MLPs), {recipe.experts_per_token} per token, router from gate_mode "
        f"`{recipe.gate_mode}`:\n\n{experts}\n\n## Recipe\n\n```yaml\n{text.rstrip()}\n```\n"
    )
