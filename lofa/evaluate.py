"""Stage ``evaluate`` (DESIGN section 6): predicted LoRAs against the baselines on held-out clips.

Methods, per held-out clip: ``base`` (no LoRA), ``oracle`` (the clip's fitted LoRA),
``predicted`` (stage II with stage-I features, from the caption alone), ``nearest``
(the fitted LoRA of the training clip whose caption is closest in text space),
``mean`` (the mean dW of all training LoRAs), ``naive`` (stage II trained without
stage-I features), ``generalist`` (one LoRA of the same rank fitted on all training
clips) and ``ceiling`` (a LoRA fitted on fresh renders of the held-out clip's stated
attributes, with its caption: what a prompt-only method could reach).

Definitions, once: flow loss = :func:`lofa.score.flow_losses` (fixed timesteps and
per-clip noise); gap closed = (base - method) / (base - oracle) of the mean losses,
with a bootstrap 95% interval over clips (:func:`lofa.score.bootstrap_gap`); response
map = ``lofa.lora.delta_response_map`` (|dW| > tau |W|), precision / recall / F1
(``map_scores``) against the oracle's map pooled over every entry; dW cosine and relative
error per matrix (``dw_scores``), averaged over matrices and clips.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lofa.artifacts.loras import LoRASet
from lofa.hypernet import HyperNet
from lofa.hypertrain import predict_loras
from lofa.judge import Judge, accuracy, frechet_distance, judge_features, label_indices
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, base_weights, delta_response_map, dw_scores, map_counts, map_scores
from lofa.score import ScoreConfig, bootstrap_gap, flow_losses, generate

METHODS = ("base", "oracle", "predicted", "nearest", "mean", "naive", "generalist", "ceiling")


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` params section."""

    eval_points: int = 8  # fixed timesteps per clip, spread over the training grid
    tau: float = 0.2  # response-map threshold: the evaluate stage sets train_stage1.loss.tau (no params key)
    sample_steps: int = 20
    guidance: float = 3.0
    # The LoRA runs in guidance's conditional branch only; the unconditional branch is the base model's.
    # Measured (32 held-out clips of a 160-clip default-shaped world, judge on oracle samples): LoRA in
    # both branches action 0.41, direction 0.59, all-attributes 0.00; conditional only 0.50, 0.72, 0.06
    # (predicted samples tie: summed accuracy 3.41 both ways). Guidance then amplifies the LoRA's change.
    lora_uncond: bool = False
    num_videos: int = 4  # side-by-side sample videos logged
    batch: int = 16
    seed: int = 0
    bootstrap: int = 2000  # resamples of the held-out clips for the gap-closed intervals
    generalist_steps: int = 300  # one LoRA on all training clips
    generalist_batch: int = 16  # clips per step
    ceiling_renders: int = 4  # fresh renders per held-out caption
    ceiling_steps: int | None = None  # None: fit_loras.steps (the oracle's budget)

    @property
    def scoring(self) -> ScoreConfig:
        return ScoreConfig(eval_points=self.eval_points, seed=self.seed, batch=self.batch,
                           sample_steps=self.sample_steps, guidance=self.guidance, lora_uncond=self.lora_uncond,
                           bootstrap=self.bootstrap)


def lora_set_weights(s: LoRASet, vocab: Vocabulary, index: list[int] | None = None) -> LoRAWeights:
    """The fitted LoRAs of ``s`` (or of ``index``) as one K = N LoRAWeights."""
    idx = list(range(len(s))) if index is None else index
    return LoRAWeights(vocab, tuple(a[idx] for a in s.A), tuple(b[idx] for b in s.B))


def mean_lora(s: LoRASet, vocab: Vocabulary) -> LoRAWeights:
    """The exact mean dW of all LoRAs of ``s`` as one LoRA of rank N r (factors concatenated)."""
    n = len(s)
    A = tuple(a.reshape(1, -1, a.shape[-1]) for a in s.A)  # (1, N r, in)
    B = tuple((b / n).permute(1, 0, 2).reshape(1, b.shape[1], -1) for b in s.B)  # (1, out, N r)
    return LoRAWeights(vocab, A, B)


def nearest_index(train_text: torch.Tensor, train_mask: torch.Tensor, text: torch.Tensor,
                  mask: torch.Tensor) -> list[int]:
    """For each prompt, the training prompt closest in mean-pooled text space (cosine)."""
    def pool(t: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return F.normalize((t * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1), dim=-1)

    return (pool(text, mask.float()) @ pool(train_text, train_mask.float()).T).argmax(1).tolist()


def _deltas(lora: LoRAWeights, k: int) -> list[torch.Tensor]:
    kk = 0 if lora.num_loras == 1 else k
    return [lora.scale_of(kk) * (b[kk].float() @ a[kk].float()) for a, b in zip(lora.A, lora.B)]


def dw_metrics(lora: LoRAWeights, oracle: LoRAWeights, W: list[torch.Tensor], tau: float) -> dict[str, float]:
    """dW relative error and cosine (``lofa.lora.dw_scores``, means over matrices and clips), and
    response-map precision / recall / F1 (``delta_response_map``, ``map_scores`` of the counts pooled
    over every entry) against the oracle."""
    rel, cos, counts = [], [], torch.zeros(3)
    shared = _deltas(lora, 0) if lora.num_loras == 1 else None  # one LoRA for every clip: its dW once
    for k in range(oracle.num_loras):
        for d, o, w in zip(shared or _deltas(lora, k), _deltas(oracle, k), W):
            scores = dw_scores(d[None], o[None])
            rel.append(float(scores["dw_rel_err"][0]))
            cos.append(float(scores["dw_cos"][0]))
            counts += map_counts(delta_response_map(d, w, tau), delta_response_map(o, w, tau))
    maps = map_scores(counts)
    return {"dw_rel_err": sum(rel) / len(rel), "dw_cos": sum(cos) / len(cos),
            "map_precision": float(maps["precision"]), "map_recall": float(maps["recall"]), "map_f1": float(maps["f1"])}


def _dw_cosine(s: LoRASet, i: int, j: int) -> float:
    """Cosine between the whole dW (every matrix, concatenated) of LoRAs i and j of ``s``."""
    dot = ni = nj = 0.0
    for a, b in zip(s.A, s.B):
        di, dj = b[i].float() @ a[i].float(), b[j].float() @ a[j].float()
        dot, ni, nj = dot + float((di * dj).sum()), ni + float(di.pow(2).sum()), nj + float(dj.pow(2).sum())
    return dot / max((ni * nj) ** 0.5, 1e-30)


def supervision_consistency(s: LoRASet, rows: Sequence[Mapping[str, str]], attributes: Sequence[str],
                            pairs: int = 200, seed: int = 0) -> dict[str, float | None]:
    """Mean dW cosine of fitted LoRAs over pairs of clips that share every stated attribute (any
    caption wording), that share the action, and whose actions differ (``pairs`` random pairs of
    each kind at most; None where a kind has none).

    ``rows``: the clips' meta.csv rows, in ``s`` order. Same-attribute agreement is what a
    prompt-only predictor can learn; its gap to other-action pairs is how much the prompt decides."""
    g = torch.Generator().manual_seed(seed)
    keys = [tuple(r[a] for a in attributes) for r in rows]
    kinds = {"same_attributes": lambda i, j: keys[i] == keys[j],
             "same_action": lambda i, j: rows[i]["action"] == rows[j]["action"],
             "other_action": lambda i, j: rows[i]["action"] != rows[j]["action"]}
    out: dict[str, float | None] = {}
    for name, keep in kinds.items():
        found = [(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if keep(i, j)]
        found = [found[k] for k in torch.randperm(len(found), generator=g)[:pairs].tolist()]
        out[f"{name}_dw_cos"] = sum(_dw_cosine(s, i, j) for i, j in found) / len(found) if found else None
        out[f"{name}_pairs"] = len(found)
    return out


def method_loras(dit: nn.Module, vocab: Vocabulary, train: LoRASet, held: LoRASet, stage2: HyperNet,
                 stage1: HyperNet, naive: HyperNet | None) -> tuple[dict[str, LoRAWeights | None], float]:
    """The LoRAs of the methods that read fitted LoRAs or hypernetworks, for the held-out clips
    (on the CPU), and the prediction time per prompt (s)."""
    W = [w.detach().float().cpu() for w in base_weights(dit, vocab)]
    t0 = time.perf_counter()
    predicted = predict_loras(stage2, stage1, vocab, W, held.clips.text, held.clips.mask)
    per_prompt = (time.perf_counter() - t0) / len(held)
    near = nearest_index(train.clips.text, train.clips.mask, held.clips.text, held.clips.mask)
    loras = {"base": None, "oracle": lora_set_weights(held, vocab), "predicted": predicted,
             "nearest": lora_set_weights(train, vocab, near), "mean": mean_lora(train, vocab)}
    if naive is not None:
        loras["naive"] = predict_loras(naive, None, vocab, W, held.clips.text, held.clips.mask)
    return loras, per_prompt


def clip_losses(dit: nn.Module, held: LoRASet, loras: Mapping[str, LoRAWeights | None],
                cfg: EvalConfig) -> dict[str, torch.Tensor]:
    """Per method, the flow loss of each held-out clip, (N,) in ``held``'s order (MLflow shows them as a table)."""
    return {m: flow_losses(dit, held.clips.latents, held.clips.text, held.clips.ids, lora, cfg.scoring)
            for m, lora in loras.items()}


def compare(dit: nn.Module, vocab: Vocabulary, held: LoRASet, loras: Mapping[str, LoRAWeights | None],
            cfg: EvalConfig, losses: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per method: flow loss (mean, median), gap closed with its bootstrap interval, share of clips
    it beats the base on, and dW / map metrics against the oracle (``loras`` on the CPU).
    ``losses``: :func:`clip_losses` when the caller already has them."""
    W = [w.detach().float().cpu() for w in base_weights(dit, vocab)]
    sc = cfg.scoring
    losses = clip_losses(dit, held, loras, cfg) if losses is None else losses
    table: dict[str, dict[str, float]] = {}
    for m, l in losses.items():
        gap, lo, hi = bootstrap_gap(losses["base"], l, losses["oracle"], sc.bootstrap, sc.seed)
        row = {"fm_loss": float(l.mean()), "fm_loss_median": float(l.median()), "gap_closed": gap,
               "gap_closed_lo": lo, "gap_closed_hi": hi, "beats_base_share": float((l < losses["base"]).float().mean())}
        if loras[m] is not None and m != "oracle":
            row.update(dw_metrics(loras[m], loras["oracle"], W, cfg.tau))
        table[m] = row
    return table


def judge_scores(dit: nn.Module, held: LoRASet, loras: Mapping[str, LoRAWeights | None], judge: Judge,
                 labels: Sequence[Mapping[str, str]], cfg: EvalConfig
                 ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Judge accuracy per attribute of samples generated per method from the held-out captions,
    and the Frechet distance of their judge features to the real held-out clips'.

    ``labels``: the held-out clips' meta.csv rows, in ``held`` order. Returns per-method scores
    (plus ``real``: the held-out clips themselves, the judge's own accuracy) and the samples.
    """
    truth = label_indices(labels, judge.attributes)
    real_feats = judge_features(judge, held.clips.latents)
    scores = {"real": accuracy(judge, held.clips.latents, truth)}
    videos = {}
    for m, lora in loras.items():
        videos[m] = generate(dit, held.clips.text, held.clips.ids, held.clips.latents.shape[1:], lora, cfg.scoring)
        scores[m] = {**accuracy(judge, videos[m], truth),
                     "frechet": frechet_distance(judge_features(judge, videos[m]), real_feats)}
    return scores, videos


def table_rows(methods: Mapping[str, Mapping[str, float]], attributes: Sequence[str] = ()) -> list[dict[str, str]]:
    """The printed table: one row per method, fm_loss, gap_closed [lo, hi], judge accuracies."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    rows = []
    for m, r in methods.items():
        row = {"method": m, "fm_loss": num(r["fm_loss"]),
               "gap_closed [95% CI]": f"{r['gap_closed']:.3f} [{r['gap_closed_lo']:.3f}, {r['gap_closed_hi']:.3f}]",
               "dw_cos": num(r.get("dw_cos")), "map_f1": num(r.get("map_f1"))}
        for a in attributes:
            row[a] = num(r.get(f"judge_{a}_acc"))
        if attributes:
            row["all"], row["frechet"] = num(r.get("judge_all_acc")), num(r.get("judge_frechet"))
        rows.append(row)
    return rows
