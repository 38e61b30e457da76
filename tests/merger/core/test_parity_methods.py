"""End-to-end parity with mergekit 0.1.5 for the methods added in issue #12 (and DARE's and
Breadcrumbs' cases that test_parity.py leaves out), on bf16-stored tiny checkpoints: `merge run`
and mergekit's `run_merge` on the same recipe give the same child (every tensor, its dtype, the
config).

The family: a bf16 base and fine-tunes of it (sparse bf16 perturbations, so task vectors look
like real ones: small, some entries untouched) plus an unrelated model. Recipes without a
`dtype` compute in bf16 (as mergekit does), the others in float32. Exact methods must match bit
for bit; where a whole-tensor reduction (SCE's weights, a norm) is summed in another order, or
ties at a top-k threshold are broken differently, the test says so and bounds the difference.
Random methods (DARE, DELLA, arcee_fusion's quantile sample) are compared on their deterministic
cases exactly and on per-tensor statistics otherwise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from merger.core.engine import run_recipe
from merger.core.options import MergeOptions
from merger.core.recipe import parse_recipe
from tests.helpers import load_tensors, mergekit_sorts_stable

CPU = MergeOptions(device="cpu")


def _finetune(base: Path, out: Path, seed: int, fraction: float, scale: float = 0.02) -> Path:
    """``base`` + noise on a random ``fraction`` of every tensor's entries, stored in bf16."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for item in base.iterdir():
        if not item.name.endswith(".safetensors"):
            shutil.copy(item, out / item.name)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in load_tensors(base).items():
        x = tensor.float()
        touched = torch.rand(x.shape, generator=g) < fraction
        size = x.abs().mean() if x.numel() > 1 else 1  # (norm weights are all 1: std 0)
        noise = scale * torch.randn(x.shape, generator=g) * size
        tensors[name] = (x + noise * touched).to(tensor.dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(make_tiny_mistral, tmp_path_factory):
    base = make_tiny_mistral("methods-base", seed=10, dtype="bfloat16")
    root = tmp_path_factory.mktemp("methods-family")
    models = {"base": base}
    for name, seed, fraction in (("b", 11, 0.5), ("c", 12, 0.3), ("d", 13, 0.7)):
        models[name] = _finetune(base, root / name, seed, fraction)
    models["other"] = make_tiny_mistral("methods-other", seed=20, dtype="bfloat16")
    return {key: str(path) for key, path in models.items()}


@pytest.fixture(scope="module")
def mergekit_run():
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    def run(text: str, out: Path) -> Path:
        # mergekit's sorts made stable, so index order is its tie rule too (ours: entries tied
        # at a threshold are ranked in index order; mergekit's torch.argsort order is arbitrary)
        config = MergeConfiguration.model_validate(yaml.safe_load(text))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # its bf16 sums in one order (they change with threads)
        try:
            with mergekit_sorts_stable():
                run_merge(config, str(out), options=MergeOptions(device="cpu", quiet=True))
        finally:
            torch.set_num_threads(threads)
        return out

    return run


def _both(text: str, family, mergekit_run, tmp_path: Path) -> tuple[dict, dict, Path, Path]:
    text = text.format(**family)
    ours = run_recipe(parse_recipe(text), tmp_path / "ours", CPU, recipe_text=text)
    theirs = mergekit_run(text, tmp_path / "theirs")
    return load_tensors(ours), load_tensors(theirs), ours, theirs


def _same_layout(mine: dict, ref: dict, ours: Path, theirs: Path) -> None:
    assert sorted(mine) == sorted(ref)
    for name, expected in ref.items():
        assert mine[name].dtype == expected.dtype, name
        assert mine[name].shape == expected.shape, name
    our_config = json.loads((ours / "config.json").read_text())
    their_config = json.loads((theirs / "config.json").read_text())
    for key in ("architectures", "hidden_size", "num_hidden_layers", "vocab_size"):
        assert our_config.get(key) == their_config.get(key), key


EXACT = {
    "passthrough_frankenmerge": """
merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - filter: down_proj
              value: [0, 1]
            - value: 1
  - sources:
      - model: {base}
        layer_range: [2, 4]
""",
    "passthrough_float32": """
merge_method: passthrough
slices:
  - sources:
      - model: {c}
        layer_range: [0, 4]
        parameters: {{scale: 0.3}}
dtype: float32
out_dtype: bfloat16
""",
    "model_stock": """
merge_method: model_stock
base_model: {base}
models:
  - model: {b}
  - model: {c}
  - model: {d}
""",
    "model_stock_filter_wise_f32": """
merge_method: model_stock
base_model: {base}
models:
  - model: {b}
  - model: {c}
parameters:
  filter_wise: true
dtype: float32
""",
    "della_density_1": """
merge_method: della
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.7, density: 1.0}}
  - model: {c}
    parameters: {{weight: 0.4, density: 1.0}}
""",
    "della_linear_density_1_f32": """
merge_method: della_linear
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.6}}
  - model: {d}
    parameters: {{weight: [0.2, 0.8]}}
parameters:
  lambda: 1.3
dtype: float32
""",
    "sce_all": """
merge_method: sce
base_model: {base}
models:
  - model: {b}
  - model: {c}
  - model: {d}
""",
    "nuslerp_base": """
merge_method: nuslerp
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.3}}
  - model: {c}
    parameters: {{weight: 0.7}}
""",
    "nuslerp_row_wise_f32": """
merge_method: nuslerp
models:
  - model: {b}
    parameters: {{weight: 0.6}}
  - model: {other}
    parameters: {{weight: 0.4}}
parameters:
  nuslerp_row_wise: true
  nuslerp_flatten: false
dtype: float32
out_dtype: bfloat16
""",
    "multislerp": """
merge_method: multislerp
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.5}}
  - model: {c}
    parameters: {{weight: 0.3}}
  - model: {d}
    parameters: {{weight: 0.2}}
""",
    "karcher": """
merge_method: karcher
models:
  - model: {b}
  - model: {c}
  - model: {other}
parameters:
  max_iter: 20
  tol: 1.0e-6
""",
    "nearswap": """
merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {b}
parameters:
  t: 0.005
""",
    "ram": """
merge_method: ram
base_model: {base}
models:
  - model: {b}
  - model: {c}
  - model: {d}
parameters:
  epsilon: 0.001
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {b}
  - model: {c}
parameters:
  r: 0.3
  alpha: 0.4
""",
    "modules_ties": """
merge_method: ties
base_model: {base}
modules:
  default:
    models:
      - model: {b}
        parameters: {{weight: 1.0}}
      - model: {c}
        parameters: {{weight: 0.5}}
    parameters:
      density: 0.6
dtype: float32
""",
    # the original task-vector methods, in float32 (their compute dtype before issue 13):
    # DARE's deterministic case (density 1: nothing dropped, nothing rescaled) and Breadcrumbs
    "dare_linear_density_1_f32": """
merge_method: dare_linear
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.7, density: 1.0}}
  - model: {c}
    parameters: {{weight: [0.2, 0.6], density: 1.0}}
dtype: float32
""",
    "dare_ties_density_1_f32": """
merge_method: dare_ties
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {c}
    parameters: {{weight: 0.5, density: 1.0}}
  - model: {d}
    parameters: {{weight: 0.3, density: 1.0}}
dtype: float32
""",
    "breadcrumbs_f32": """
merge_method: breadcrumbs
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.6, density: 0.9, gamma: 0.05}}
  - model: {c}
    parameters: {{weight: 0.4, density: 0.8, gamma: 0.1}}
dtype: float32
""",
    "breadcrumbs_ties_f32": """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 0.6, density: 0.9, gamma: 0.05}}
  - model: {d}
    parameters: {{weight: 0.4, density: 0.7, gamma: 0.02}}
dtype: float32
""",
    "residual_weight_slerp": """
merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
    residual_weight: 0.3
parameters:
  t: 0.4
dtype: float32
""",
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_child_equals_mergekits(name, family, mergekit_run, tmp_path):
    """Every tensor bit for bit, the reducing methods too (model_stock, nuslerp, multislerp,
    karcher, sce: a whole-tensor norm, dot product or mean), with mergekit on one thread:
    torch's bf16 .sum/.mean depend on the thread count (a 100k-entry bf16 sum: -5.09375 on one
    thread, -5.125 on two, exactly -5.0917), so mergekit's own child changes with its core
    count; ours sums in one order (torch.norm's lanes; float64 for .sum/.mean, which is
    one thread's value once rounded)."""
    mine, ref, ours, theirs = _both(EXACT[name], family, mergekit_run, tmp_path)
    _same_layout(mine, ref, ours, theirs)
    differ = [n for n in ref if not torch.equal(mine[n], ref[n])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[:3]}"


def _index_order_sce_mask(tvs, density, mask_dtype=None):
    """mergekit's sce_mask, but with ties at the threshold kept in index order (ours)."""
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=mask_dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=mask_dtype)
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var, dtype=mask_dtype)
    if k:
        order = torch.sort(var.abs().view(-1), descending=True, stable=True).indices
        mask.view(-1)[order[:k]] = 1
    return mask


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sce_with_selection_is_mergekits_with_index_order_ties(
    dtype, family, mergekit_run, tmp_path, monkeypatch
):
    """The variances of bf16 task vectors tie at the top-k threshold; torch.topk keeps
    arbitrary ones of them, we keep them in index order (exactly k either way, as TIES).
    With that one rule given to mergekit too, the children are the same, bit for bit."""
    import mergekit.merge_methods.sce as mergekit_sce

    monkeypatch.setattr(mergekit_sce, "sce_mask", _index_order_sce_mask)
    text = f"""
merge_method: sce
base_model: {{base}}
models:
  - model: {{b}}
  - model: {{c}}
parameters:
  select_topk: 0.5
dtype: {dtype}
"""
    mine, ref, ours, theirs = _both(text, family, mergekit_run, tmp_path)
    _same_layout(mine, ref, ours, theirs)
    differ = [n for n in ref if not torch.equal(mine[n], ref[n])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[:3]}"


def _kept(child: torch.Tensor, base: torch.Tensor) -> float:
    return float((child != base).float().mean())


@pytest.mark.parametrize(
    ("method", "epsilon"),
    [("della_linear", 0.2), ("della", 0.2), ("dare_linear", None), ("dare_ties", None)],
)
def test_random_drops_are_distributed_like_mergekits(
    method, epsilon, family, mergekit_run, tmp_path
):
    """One model, weight 1: the child's task vector is the sparsified, rescaled one (DELLA's
    magnitude-ranked drop, DARE's uniform drop; one model's signs elect themselves). Per
    tensor (1000+ entries) the kept fraction and the L1 norm of the task vector agree with
    mergekit's (different draws, the same distribution), and the kept fraction is the one
    the method promises: density for DARE, between density -/+ epsilon for DELLA."""
    density = 0.4
    extra = f", epsilon: {epsilon}" if epsilon is not None else ""
    text = f"""
merge_method: {method}
base_model: {{base}}
models:
  - model: {{d}}
    parameters: {{{{weight: 1.0, density: {density}{extra}}}}}
"""
    mine, ref, ours, theirs = _both(text, family, mergekit_run, tmp_path)
    _same_layout(mine, ref, ours, theirs)
    base = load_tensors(Path(family["base"]))
    finetune = load_tensors(Path(family["d"]))
    spread = epsilon or 0.0
    checked = 0
    for n, expected in ref.items():
        b = base[n]
        if b.numel() < 1000:
            continue
        touched = _kept(finetune[n], b)
        ours_kept, theirs_kept = _kept(mine[n], b), _kept(expected, b)
        sigma = (density * (1 - density) * touched / b.numel()) ** 0.5
        assert abs(ours_kept - theirs_kept) < 5 * sigma + 0.002, (n, ours_kept, theirs_kept)
        # unchanged entries stay the base's, kept or not: the visible keep rate is the changed
        # entries' (DELLA ranks them above the unchanged ones, whose delta is 0)
        low, high = (density - spread) * touched, (density + spread) * touched
        assert low - 5 * sigma < ours_kept < high + 5 * sigma, (n, ours_kept, touched)
        # rescaled by 1/p: the L1 norm of the task vector is kept, as mergekit keeps it
        l1_ours = float((mine[n].float() - b.float()).abs().sum())
        l1_theirs = float((expected.float() - b.float()).abs().sum())
        l1_full = float((finetune[n].float() - b.float()).abs().sum())
        # the spread of a rescaled L1 norm: each changed entry |d| counts |d|/p with chance p,
        # so its relative sd is sqrt((1-p)/p * sum d^2) / sum |d| (p: the lowest keep chance;
        # mergekit's draws are not seeded, so the bound is statistical, not a fixed number)
        delta = (finetune[n].double() - b.double()).abs()
        p = density - spread
        rel = float(((1 - p) / p * (delta**2).sum()).sqrt() / delta.sum())
        # and each kept entry is stored as bf16(base + d/p): up to half an ulp of that value off,
        # which next to a small delta is not small (the rounding bound, as a fraction of sum |d|)
        kept_value = (b.double().abs() + delta / p)[delta > 0]
        ulp = torch.exp2(torch.floor(torch.log2(kept_value)) - 7)
        rounding = float(p * ulp.sum() / 2 / delta.sum())
        bound = 6 * rel + rounding + 0.01
        assert abs(l1_ours / l1_theirs - 1) < 2 * bound, (n, rel, rounding)
        assert abs(l1_ours / l1_full - 1) < bound, (n, rel, rounding)
        checked += 1
    assert checked >= 10


def test_arcee_fusion_matches_and_samples_like_mergekit(family, mergekit_run, tmp_path):
    """Tensors up to 1M entries: exact. The embeddings and head (1.02M entries) take their
    quantiles from 1M random draws: the fraction of fused entries agrees with mergekit's."""
    text = """
merge_method: arcee_fusion
base_model: {base}
models:
  - model: {base}
  - model: {b}
"""
    mine, ref, ours, theirs = _both(text, family, mergekit_run, tmp_path)
    _same_layout(mine, ref, ours, theirs)
    assert next(iter(ref.values())).dtype == torch.float32  # mergekit stores its float32 result
    base = load_tensors(Path(family["base"]))
    sampled = 0
    for n, expected in ref.items():
        if expected.numel() <= 1_000_000:
            assert torch.equal(mine[n], expected), n
            continue
        sampled += 1
        b = base[n].float()
        fused_ours, fused_theirs = _kept(mine[n], b), _kept(expected, b)
        assert abs(fused_ours - fused_theirs) < 0.002, (n, fused_ours, fused_theirs)
    assert sampled == 2


def test_della_with_a_bad_epsilon_is_refused_before_merging(family, tmp_path):
    from kruising.errors import KruisingError

    text = """
merge_method: della
base_model: {base}
models:
  - model: {b}
    parameters: {{weight: 1.0, density: 0.9, epsilon: 0.15}}
""".format(**family)
    with pytest.raises(KruisingError, match=r"density 0.9 \+/- epsilon 0.15 must stay inside"):
        run_recipe(parse_recipe(text), tmp_path / "child", CPU, recipe_text=text)
    assert not (tmp_path / "child").exists()


def test_model_stock_needs_a_base_and_two_models(family, tmp_path):
    from kruising.errors import KruisingError

    text = """
merge_method: model_stock
base_model: {base}
models:
  - model: {b}
""".format(**family)
    with pytest.raises(KruisingError, match=r"model_stock merges at least 3 models \(base"):
        run_recipe(parse_recipe(text), tmp_path / "child", CPU, recipe_text=text)


def test_multislerp_of_unchanged_tensors_is_refused_like_mergekit(family, tmp_path):
    """Three fine-tunes that left a tensor unchanged: the mean direction is zero. mergekit
    raises mid-merge; we say which tensor, with a hint, and keep nothing."""
    from kruising.errors import KruisingError

    copies = [_finetune(Path(family["base"]), tmp_path / f"copy{i}", i, 0.0) for i in range(3)]
    text = f"""
merge_method: multislerp
base_model: {family["base"]}
models:
""" + "".join(f"  - model: {c}\n    parameters: {{weight: 1.0}}\n" for c in copies)
    with pytest.raises(KruisingError, match="multislerp cannot merge .*: the weighted mean"):
        run_recipe(parse_recipe(text), tmp_path / "child", CPU, recipe_text=text)
    assert not (tmp_path / "child").exists()


def test_a_model_listed_twice_is_refused_like_mergekit(family, tmp_path):
    from kruising.errors import KruisingError

    text = """
merge_method: linear
models:
  - model: {b}
    parameters: {{weight: 1.0}}
  - model: {b}
    parameters: {{weight: 2.0}}
""".format(**family)
    with pytest.raises(KruisingError, match="lists .* twice"):
        run_recipe(parse_recipe(text), tmp_path / "child", CPU, recipe_text=text)


def test_modules_with_another_name_is_refused(family, tmp_path):
    from kruising.errors import KruisingError

    text = """
merge_method: linear
modules:
  decoder:
    models:
      - model: {b}
        parameters: {{weight: 1.0}}
""".format(**family)
    with pytest.raises(KruisingError, match="a decoder-only model has one module, 'default'"):
        run_recipe(parse_recipe(text), tmp_path / "child", CPU, recipe_text=text)
