"""Does the hypernetwork learn the prompt? Stage-II term balance, dW cosines, stage-I map F1 (CPU).

Builds (once) a small world-v2 world with library calls under ``--world`` (the
``params.yaml`` sections: synthesize, preprocess, pretrain the base on coarse captions,
fit one LoRA per clip), trains stage I, then measures:

1. gradient norms of each stage-II term, unweighted, with respect to the hypernetwork's
   outputs (A, B, alpha), the output heads (the last layer) and the last trunk block
   (the last shared layer), at init and after each objective's training; their ratio
   gives the weights that make the terms' gradients equal (docs/objectives.md);
2. for each objective in ``--objectives`` (``paper``: L1 + 10 x flow; ``balanced``):
   train stage II, then the predicted LoRA's per-matrix dW cosine to each clip's fitted
   LoRA on training and held-out clips, against the mean training LoRA's cosine (the
   same per-matrix cosine, averaged over matrices and clips: ``lofa.lora.dw_scores``);
3. stage I's held-out response-map F1 (pooled entries, ``lofa.lora.map_scores``)
   against the nearest-neighbour LoRA's (the training clip with the closest caption).

Prints JSON (``--out`` writes it too). Run it single-threaded beside other work:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stage2_balance.py --out /tmp/stage2_balance.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofa.config import from_dict, to_dict  # noqa: E402
from lofa.artifacts.hypernets import load_hypernet  # noqa: E402
from lofa.artifacts.loras import LoRASet  # noqa: E402
from lofa.hypertrain import (Stage1Config, Stage2Config, build_hypernet, evaluate_stage1,  # noqa: E402
                             evaluate_stage2, predict_loras, stage2_batches, train_stage1, train_stage2)
from lofa.lora import base_weights, delta_response_map, dw_scores, map_counts, map_scores  # noqa: E402
from lofa.objectives import Stage2LossConfig, stage2_terms  # noqa: E402
from lofa.train import TrainConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_world(world: Path, params: dict, num_clips: int | None) -> None:
    """synth -> preprocess -> pretrain -> fit under ``world`` (each step skipped when its output is there)."""
    from lofa.data.dataset import load_clips
    from lofa.data.preprocess import PreprocessConfig, load_manifest, preprocess
    from lofa.data.synthetic import SynthConfig, generate
    from lofa.fit import ClipRecord, FitConfig, fit_shard
    from lofa.pretrain import PretrainConfig, pretrain
    from pipelines._hyper import load_base

    d = {k: world / k for k in ("synth", "pre", "base", "loras")}
    synth = dict(params["synthetic"], **({"num_clips": num_clips} if num_clips else {}))
    t0 = time.perf_counter()
    if not (d["pre"] / "manifest.parquet").exists():
        generate(SynthConfig.from_params(synth), d["synth"], progress=False)
        preprocess(from_dict(PreprocessConfig, params["preprocess"]), d["synth"], d["pre"], progress=False)
    if not (d["base"] / "dit.safetensors").exists():
        pretrain(from_dict(PretrainConfig, params["pretrain_base"]), load_clips(d["pre"], ("train",)), d["base"])
    dit, _, base_hash = load_base(d["base"])
    records = [ClipRecord(r.id, str(d["pre"] / r.path), r.caption) for r in load_manifest(d["pre"]).itertuples()]
    fit_shard(dit, records, d["loras"], from_dict(FitConfig, params["fit_loras"]), base_hash=base_hash,
              progress=False)
    print(f"world ready in {time.perf_counter() - t0:.0f} s: {world}", file=sys.stderr)


def deltas(A, B, i: int) -> list[torch.Tensor]:
    return [b[i].float() @ a[i].float() for a, b in zip(A, B)]


def cosines(pred: list[list[torch.Tensor]], fitted: LoRASet) -> float:
    """Mean over clips and matrices of the cosine between pred[k][j] and clip k's fitted dW of matrix j."""
    cos = [dw_scores(p[None], t[None])["dw_cos"] for k in range(len(fitted))
           for p, t in zip(pred[k], deltas(fitted.A, fitted.B, k))]
    return float(torch.cat(cos).mean())


def predicted_cosines(stage2, stage1, vocab, W, data: LoRASet) -> float:
    lora = predict_loras(stage2, stage1, vocab, W, data.clips.text, data.clips.mask)
    return cosines([deltas(lora.A, lora.B, k) for k in range(len(data))], data)


def mean_delta(data: LoRASet) -> list[torch.Tensor]:
    return [torch.einsum("nor,nri->oi", b.float(), a.float()) / len(data) for a, b in zip(data.A, data.B)]


def nearest_map_f1(train: LoRASet, held: LoRASet, W: list[torch.Tensor], tau: float) -> dict[str, float]:
    """Pooled response-map scores of each held-out clip's nearest training LoRA (by caption) against its own."""
    from lofa.evaluate import nearest_index

    near = nearest_index(train.clips.text, train.clips.mask, held.clips.text, held.clips.mask)
    counts = torch.zeros(3, dtype=torch.float64)
    for k, n in enumerate(near):
        for p, t, w in zip(deltas(train.A, train.B, n), deltas(held.A, held.B, k), W):
            counts += map_counts(delta_response_map(p, w, tau), delta_response_map(t, w, tau)).double()
    return {k: float(v) for k, v in map_scores(counts).items()}


def grad_norms(model, stage1, batches, dit, draws: list[int]) -> dict[str, dict[str, float]]:
    """Per term (l1, dw_rel_l1, dw_rel_l2, fm), unweighted: mean over ``draws`` of its value and of the norm of its
    gradient w.r.t. the hypernetwork's outputs (A, B and alpha of every matrix: ``grad_out``), the
    output heads' weights (the last layer: ``grad_heads``) and the last trunk block with the final
    norm (the last shared layer: ``grad_last_block``)."""
    heads = [p for n, p in model.named_parameters() if n.startswith(("heads.", "alpha_head."))]
    last = list(model.blocks[-1].parameters()) + list(model.norm.parameters())
    out: dict[str, dict[str, list[float]]] = {}
    model.train()
    for draw in draws:
        terms, _, outs = stage2_terms(model, stage1, batches(draw, 0, 1), dit)
        preds = [t for o in outs for t in (o.A, o.B, o.alpha)]
        for name, t in terms.items():
            g_out = torch.autograd.grad(t, preds, retain_graph=True, allow_unused=True)
            g_head = torch.autograd.grad(t, heads, retain_graph=True, allow_unused=True)
            g_last = torch.autograd.grad(t, last, retain_graph=True, allow_unused=True)
            norm = lambda gs: float(torch.sqrt(sum((g.float() ** 2).sum() for g in gs if g is not None)))  # noqa: E731
            r = out.setdefault(name, {"value": [], "grad_out": [], "grad_heads": [], "grad_last_block": []})
            r["value"].append(float(t.detach()))
            r["grad_out"].append(norm(g_out))
            r["grad_heads"].append(norm(g_head))
            r["grad_last_block"].append(norm(g_last))
    return {n: {k: sum(v) / len(v) for k, v in r.items()} for n, r in out.items()}


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def fresh(path: Path) -> Path:
    """An empty run directory (never resume a run of other settings)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, default=Path("/tmp/lofa_stage2_balance/world"))
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--num-clips", type=int, default=None, help="synthetic.num_clips (default: the preset's)")
    ap.add_argument("--objectives", default="paper,balanced")
    ap.add_argument("--steps", type=int, default=None, help="stage-II steps (default: params' train_stage2)")
    ap.add_argument("--stage1-steps", type=int, default=None, help="stage-I steps (default: params')")
    ap.add_argument("--probe-draws", type=int, default=4, help="batches averaged per gradient probe")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    params = yaml.safe_load(args.params.read_text())
    build_world(args.world, params, args.num_clips)
    from pipelines._hyper import load_base, load_sets

    dit, vocab, base_hash = load_base(args.world / "base")
    dit.requires_grad_(False).eval()
    train_set, held = load_sets(args.world / "loras", args.world / "pre", vocab)
    W = [w.detach().float() for w in base_weights(dit, vocab)]
    res: dict = {"world": str(args.world), "clips": {"train": len(train_set), "heldout": len(held)}}

    # stage I (reused from an earlier run of the same config and world) and the nearest-neighbour map
    c1 = from_dict(Stage1Config, params["train_stage1"], "train_stage1")
    if args.stage1_steps:
        c1 = dataclasses.replace(c1, train=dataclasses.replace(c1.train, max_steps=args.stage1_steps))
    s1_dir = args.world / "runs" / f"stage1_{config_hash(c1)}"
    t0 = time.perf_counter()
    if (s1_dir / "model.safetensors").exists():
        stage1 = load_hypernet(s1_dir / "model.safetensors")
    else:
        stage1, _ = train_stage1(c1, dit, vocab, train_set, fresh(s1_dir), base_hash=base_hash)
    stage1.requires_grad_(False).eval()
    res["stage1"] = {"steps": c1.train.max_steps, "seconds": round(time.perf_counter() - t0, 1),
                     "train": evaluate_stage1(stage1, train_set, W, vocab, c1.loss),
                     "heldout": evaluate_stage1(stage1, held, W, vocab, c1.loss),
                     "nearest_heldout": nearest_map_f1(train_set, held, W, c1.loss.tau)}

    # stage II: each objective's gradient norms at init and after its training, dW cosines
    c2 = from_dict(Stage2Config, params["train_stage2"], "train_stage2")
    if args.steps:
        c2 = dataclasses.replace(c2, train=dataclasses.replace(c2.train, max_steps=args.steps))
    mean = mean_delta(train_set)
    res["mean_lora"] = {"train_dw_cos": cosines([mean] * len(train_set), train_set),
                        "heldout_dw_cos": cosines([mean] * len(held), held)}
    batches = stage2_batches(train_set, W, vocab, c2)
    draws = list(range(10_000, 10_000 + args.probe_draws))  # batches no training run draws first
    res["grad_norms_init"] = grad_norms(build_hypernet(c2.model, vocab, c2.seed), stage1, batches, dit, draws)
    for objective in args.objectives.split(","):
        loss = c2.loss if objective == c2.loss.objective else Stage2LossConfig(objective=objective)
        cfg = dataclasses.replace(c2, loss=loss)
        t0 = time.perf_counter()
        model, result = train_stage2(cfg, dit, vocab, stage1, train_set,
                                     fresh(args.world / "runs" / f"stage2_{objective}"), base_hash=base_hash)
        seconds = round(time.perf_counter() - t0, 1)
        res[objective] = {
            "weights": list(cfg.loss.weights), "steps": cfg.train.max_steps, "seconds": seconds,
            "train_last_logged": {k: float(v) for k, v in result.metrics.items()},
            "train_dw_cos": predicted_cosines(model, stage1, vocab, W, train_set),
            "heldout_dw_cos": predicted_cosines(model, stage1, vocab, W, held),
            "heldout": evaluate_stage2(model, stage1, held, W, vocab, dit, cfg),
            "grad_norms_end": grad_norms(model, stage1, batches, dit, draws)}
        print(json.dumps({objective: res[objective]}), file=sys.stderr, flush=True)
    for when, g in [("init", res["grad_norms_init"])] + [
            (f"end_{o}", res[o]["grad_norms_end"]) for o in args.objectives.split(",")]:
        res.setdefault("fm_weight_for_equal_grads", {})[when] = {  # dW weight 1: fm_weight |grad fm| = |grad dW|
            f"{dw}_{where}": g[dw][where] / max(g["fm"][where], 1e-30)
            for dw in ("l1", "dw_rel_l1", "dw_rel_l2") for where in ("grad_out", "grad_heads", "grad_last_block")}

    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
