"""Stage ``evaluate`` (DESIGN section 6): predicted LoRAs against the baselines on held-out clips.

Methods, per held-out clip: ``base`` (no LoRA), ``oracle`` (the clip's fitted LoRA),
``predicted`` (stage II with stage-I features, from the caption alone),
``nearest`` (the fitted LoRA of the training clip whose caption is closest in
text space), ``mean`` (the mean dW of all training LoRAs) and ``naive`` (stage II
trained without stage-I features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lofa.hypernet import HyperNet
from lofa.hypertrain import LoRASet, predict_loras
from lofa.judge import JudgeConfig, accuracy, frechet_distance, judge_features, train_judge
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, base_weights
from lofa.sampling import sample
from lofa.wan import flow_loss, flow_schedule

METHODS = ("base", "oracle", "predicted", "nearest", "mean", "naive")


@dataclass(frozen=True)
class EvalConfig:
    """The ``evaluate`` params section."""

    eval_points: int = 8  # fixed timesteps per clip, spread over the training grid
    tau: float = 0.2  # response-map threshold (= train_stage1.loss.tau)
    sample_steps: int = 20
    guidance: float = 3.0
    num_videos: int = 4  # side-by-side sample videos logged
    batch: int = 16
    seed: int = 0
    judge: JudgeConfig = field(default_factory=JudgeConfig)


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


def _select(lora: LoRAWeights | None, idx: list[int]) -> LoRAWeights | None:
    if lora is None or lora.num_loras == 1:
        return lora
    return LoRAWeights(lora.vocab, tuple(a[idx] for a in lora.A), tuple(b[idx] for b in lora.B), lora.scale)


@torch.no_grad()
def eval_flow_losses(dit: nn.Module, held: LoRASet, lora: LoRAWeights | None, cfg: EvalConfig) -> torch.Tensor:
    """(N,) flow-matching loss of each clip at fixed timesteps and noise (same for every method).

    The DiT runs on its own device; the noise is drawn on the CPU, so every device sees the same."""
    dev = next(dit.parameters()).device
    grid = flow_schedule().timesteps
    ts = grid[((torch.arange(cfg.eval_points) + 0.5) * len(grid) / cfg.eval_points).long()]
    lat, ctx = held.clips.latents, held.clips.text
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn((cfg.eval_points, *lat.shape), generator=g)
    out = torch.zeros(len(held))
    for start in range(0, len(held), cfg.batch):
        idx = list(range(start, min(len(held), start + cfg.batch)))
        sub = None if lora is None else _select(lora, idx).to(dev)
        x, c = lat[idx].to(dev), ctx[idx].to(dev)
        for j, t in enumerate(ts):
            out[idx] += flow_loss(dit, x, c, t.expand(len(idx)).to(dev), noise[j, idx].to(dev), lora=sub).cpu()
    return out / cfg.eval_points


def _deltas(lora: LoRAWeights, k: int) -> list[torch.Tensor]:
    kk = 0 if lora.num_loras == 1 else k
    return [lora.scale_of(kk) * (b[kk].float() @ a[kk].float()) for a, b in zip(lora.A, lora.B)]


def dw_metrics(lora: LoRAWeights, oracle: LoRAWeights, W: list[torch.Tensor], tau: float) -> dict[str, float]:
    """dW relative error and cosine, and response-map precision/recall/F1, against the oracle (means)."""
    rel, cos, tp, fp, fn = [], [], 0.0, 0.0, 0.0
    for k in range(oracle.num_loras):
        for d, o, w in zip(_deltas(lora, k), _deltas(oracle, k), W):
            rel.append(float((d - o).norm() / o.norm().clamp_min(1e-12)))
            cos.append(float(F.cosine_similarity(d.flatten(), o.flatten(), dim=0)))
            wa = w.abs().clamp_min(1e-12)
            p, t = d.abs() / wa > tau, o.abs() / wa > tau
            tp, fp, fn = tp + float((p & t).sum()), fp + float((p & ~t).sum()), fn + float((~p & t).sum())
    prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"dw_rel_err": sum(rel) / len(rel), "dw_cos": sum(cos) / len(cos), "map_precision": prec,
            "map_recall": rec, "map_f1": 2 * prec * rec / max(prec + rec, 1e-12)}


def method_loras(dit: nn.Module, vocab: Vocabulary, train: LoRASet, held: LoRASet, stage2: HyperNet,
                 stage1: HyperNet, naive: HyperNet | None) -> tuple[dict[str, LoRAWeights | None], float]:
    """Every method's LoRAs for the held-out clips (on the CPU), and the prediction time per prompt (s)."""
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


def compare(dit: nn.Module, vocab: Vocabulary, held: LoRASet, loras: dict[str, LoRAWeights | None],
            cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """Per method: flow loss (mean, median), share of the base -> oracle gap closed, dW and map metrics
    (``loras`` on the CPU; the DiT runs on its device)."""
    W = [w.detach().float().cpu() for w in base_weights(dit, vocab)]
    losses = {m: eval_flow_losses(dit, held, lora, cfg) for m, lora in loras.items()}
    base, oracle = losses["base"].mean(), losses["oracle"].mean()
    table: dict[str, dict[str, float]] = {}
    for m, l in losses.items():
        row = {"fm_loss": float(l.mean()), "fm_loss_median": float(l.median()),
               "gap_closed": float((base - l.mean()) / (base - oracle)),
               "beats_base_share": float((l < losses["base"]).float().mean())}
        if loras[m] is not None and m != "oracle":
            row.update(dw_metrics(loras[m], loras["oracle"], W, cfg.tau))
        table[m] = row
    return table


@torch.no_grad()
def generate(dit: nn.Module, held: LoRASet, lora: LoRAWeights | None, cfg: EvalConfig) -> torch.Tensor:
    """Latents sampled from each held-out caption (fixed seed per clip), with ``lora``; on the CPU."""
    out = []
    for start in range(0, len(held), cfg.batch):
        idx = list(range(start, min(len(held), start + cfg.batch)))
        g = torch.Generator().manual_seed(cfg.seed + start)
        out.append(sample(dit, held.clips.text[idx], tuple(held.clips.latents.shape[1:]), steps=cfg.sample_steps,
                          guidance=cfg.guidance, generator=g, lora=_select(lora, idx)).cpu())
    return torch.cat(out)


def judge_scores(dit: nn.Module, train: LoRASet, held: LoRASet, loras: dict[str, LoRAWeights | None],
                 labels: dict[str, tuple[int, int]], num_labels: tuple[int, int], cfg: EvalConfig
                 ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Judge accuracy (action, colour) of videos generated per method, Frechet distance to real clips.

    ``labels`` maps clip id -> (action index, colour index). The judge trains on the
    training clips only. Returns per-method scores (``real`` = the held-out clips
    themselves, the judge's ceiling) and the generated latents.
    """
    def lab(s: LoRASet) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = torch.tensor([labels[i] for i in s.clips.ids])
        return pairs[:, 0], pairs[:, 1]

    judge = train_judge(train.clips.latents, *lab(train), *num_labels, cfg.judge)
    acts, cols = lab(held)
    real_feats = judge_features(judge, held.clips.latents)
    scores = {"real": accuracy(judge, held.clips.latents, acts, cols)}
    videos = {}
    for m in ("base", "oracle", "predicted", "nearest", "mean", "naive"):
        if m not in loras:
            continue
        videos[m] = generate(dit, held, loras[m], cfg)
        scores[m] = {**accuracy(judge, videos[m], acts, cols),
                     "frechet": frechet_distance(judge_features(judge, videos[m]), real_feats)}
    return scores, videos
