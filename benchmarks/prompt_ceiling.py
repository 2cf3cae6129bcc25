"""How much of the base -> oracle gap can any prompt-level LoRA close? (synthetic profile, CPU)

Reads the default pipeline's outputs (data/base, data/loras, data/preprocessed,
data/motionx_synth/meta.csv) and compares, on the held-out clips, LoRAs that use
what a caption says and nothing clip-specific:

  same_action_mean   the mean dW of the fitted LoRAs of training clips of the same action
  action_lora        one LoRA fitted jointly on all training clips of the same action
  wrong_action_lora  the same, for another action (does the action matter at all?)
  all_train_lora     one LoRA fitted jointly on every training clip (more training of the base)

with the flow-matching loss at the evaluation's fixed timesteps and noise (``lofa.evaluate``).
A hypernetwork reads the caption only, so these bound what it can learn from this data.
Prints JSON (``--out`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofa.config import from_dict  # noqa: E402
from lofa.evaluate import EvalConfig, compare, lora_set_weights  # noqa: E402
from lofa.fit import FitConfig, init_lora  # noqa: E402
from lofa.artifacts.loras import LoRASet, load_lora_set  # noqa: E402
from lofa.layers import Vocabulary  # noqa: E402
from lofa.lora import LoRAWeights  # noqa: E402
from lofa.artifacts.base import load_base  # noqa: E402
from lofa.wan import flow_loss, sample_timesteps  # noqa: E402


def fit_shared(dit, vocab: Vocabulary, clips, index: list[int], cfg: FitConfig, steps: int, batch: int,
               seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One LoRA fitted on the clips ``index`` together (random clips, timesteps, noise each step)."""
    g = torch.Generator().manual_seed(seed)
    lora = init_lora(vocab, cfg, [g], "cpu")
    opt = torch.optim.AdamW([*lora.A, *lora.B], lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    pick = torch.tensor(index)
    for _ in range(steps):
        b = pick[torch.randint(len(pick), (batch,), generator=g)]
        noise = torch.randn((batch, *clips.latents.shape[1:]), generator=g)
        loss = flow_loss(dit, clips.latents[b], clips.text[b], sample_timesteps(batch, g), noise, lora=lora,
                         reduction="mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [a.detach()[0] for a in lora.A], [b.detach()[0] * float(lora.scale) for b in lora.B]


def per_clip(vocab: Vocabulary, held: LoRASet, choose) -> LoRAWeights:
    """K = held-out clips LoRAWeights; ``choose(clip_id)`` gives (A list, B list) of that clip's LoRA."""
    picks = [choose(c) for c in held.clips.ids]
    rank = max(p[0][0].shape[0] for p in picks)

    def pad_a(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])

    def pad_b(b: torch.Tensor) -> torch.Tensor:
        return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
    return LoRAWeights(vocab, tuple(torch.stack([pad_a(p[0][j]) for p in picks]) for j in range(len(vocab))),
                       tuple(torch.stack([pad_b(p[1][j]) for p in picks]) for j in range(len(vocab))))


def mean_of(train: LoRASet, index: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The exact mean dW of some fitted LoRAs, as one LoRA of rank n r."""
    n = len(index)
    return ([a[index].reshape(-1, a.shape[-1]) for a in train.A],
            [(b[index] / n).permute(1, 0, 2).reshape(b.shape[1], -1) for b in train.B])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=Path("data/base"))
    ap.add_argument("--loras", type=Path, default=Path("data/loras"))
    ap.add_argument("--data", type=Path, default=Path("data/preprocessed"))
    ap.add_argument("--meta", type=Path, default=Path("data/motionx_synth/meta.csv"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--steps", type=int, default=200, help="steps of each jointly fitted LoRA")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = load_base(args.base)
    dit, vocab = base.dit.eval().requires_grad_(False), base.vocabulary()
    params = yaml.safe_load(args.params.read_text())
    cfg = from_dict(FitConfig, params["fit_loras"], "fit_loras")
    train = load_lora_set(args.loras, args.data, vocab, ("train",))
    held = load_lora_set(args.loras, args.data, vocab, ("val", "test"))
    action = pd.read_csv(args.meta).set_index("id")["action"].to_dict()
    actions = sorted({action[c] for c in train.clips.ids})
    members = {a: [i for i, c in enumerate(train.clips.ids) if action[c] == a] for a in actions}
    fitted = {a: fit_shared(dit, vocab, train.clips, members[a], cfg, args.steps, args.batch, k)
              for k, a in enumerate(actions)}
    everything = fit_shared(dit, vocab, train.clips, list(range(len(train))), cfg, args.steps, args.batch, 99)
    means = {a: mean_of(train, members[a]) for a in actions}
    other = {a: actions[(k + 1) % len(actions)] for k, a in enumerate(actions)}
    loras = {"base": None, "oracle": lora_set_weights(held, vocab),
             "same_action_mean": per_clip(vocab, held, lambda c: means[action[c]]),
             "action_lora": per_clip(vocab, held, lambda c: fitted[action[c]]),
             "wrong_action_lora": per_clip(vocab, held, lambda c: fitted[other[action[c]]]),
             "all_train_lora": per_clip(vocab, held, lambda c: everything)}
    table = compare(dit, vocab, held, loras, EvalConfig(tau=params.get("evaluate", {}).get("tau", 0.2)))
    report = {"heldout_clips": len(held), "train_clips": len(train), "steps": args.steps,
              "seconds": round(time.perf_counter() - t0, 1),
              "methods": {m: {k: round(v, 4) for k, v in r.items()
                              if k in ("fm_loss", "gap_closed", "beats_base_share", "dw_cos")} for m, r in table.items()}}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
