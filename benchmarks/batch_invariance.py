"""Probe: how much does a clip's fitted LoRA depend on which clips share its batch?

``fit_batch`` fits K independent LoRAs in one loop; each clip's timesteps, noise and
init come from its own seed, so mathematically a clip's LoRA does not depend on its
batch. Numerically it can: a batched matmul may sum in another order for another K
(CPU kernels block by shape), and a resumed ``fit_loras`` run refits the missing clips
in other batches than an uninterrupted run did. This probe fits the same clips in
batches of 4 (the reference), 1, 3 and 4-shifted-by-one on a small world, single
threaded as the fault tests run, and prints JSON: the largest absolute difference of
any A/B entry, the entries' scale, and the relative Frobenius error of each clip's dW.
``tests/test_faults.py`` takes its tolerance from these figures.

    .venv/bin/python benchmarks/batch_invariance.py [--clips 12] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from lofa.config import from_dict
from lofa.data.dataset import load_clips
from lofa.data.preprocess import PreprocessConfig, load_manifest, preprocess
from lofa.data.synthetic import SynthConfig, generate
from lofa.fit import ClipRecord, FitConfig, derive_seed, fit_batch, load_clip
from lofa.pretrain import PretrainConfig, pretrain
from pipelines._hyper import load_base

WORLD = {
    "synthetic": {"preset": "default", "seed": 1, "num_clips": 24, "frames": 9, "height": 32, "width": 32,
                  "num_heldout_combos": 1, "num_heldout_templates": 1},
    "preprocess": {"num_frames": 9, "fps": 8.0, "height": 32, "width": 32, "text_max_length": 16},
    "pretrain_base": {"dit": {"dim": 96, "ffn_dim": 192, "num_heads": 2, "num_layers": 2, "text_dim": 384},
                      "batch_size": 8, "train": {"max_steps": 20, "lr": 1e-3, "log_every": 10, "ckpt_every": 10}},
}


def _fit(dit, vocab, clips, cfg, batches):
    """Fit ``clips`` grouped as ``batches`` (lists of indices); return per-clip (A, B) lists."""
    out = {}
    for idx in batches:
        lat = torch.stack([clips[i][1] for i in idx])
        ctx = torch.stack([clips[i][2] for i in idx])
        res = fit_batch(dit, vocab, lat, ctx, cfg, [derive_seed(cfg.seed, clips[i][0]) for i in idx])
        for k, i in enumerate(idx):
            out[i] = ([a[k] for a in res.lora.A], [b[k] for b in res.lora.B], float(res.final_loss[k]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="lofa-batchinv-"))
    generate(SynthConfig.from_params(WORLD["synthetic"]), tmp / "synth", progress=False)
    preprocess(from_dict(PreprocessConfig, WORLD["preprocess"]), tmp / "synth", tmp / "pre", progress=False)
    pretrain(from_dict(PretrainConfig, WORLD["pretrain_base"]), load_clips(tmp / "pre", ("train",)), tmp / "base")
    dit, vocab, _ = load_base(tmp / "base")
    records = [ClipRecord(r.id, str(tmp / "pre" / r.path), r.caption)
               for r in load_manifest(tmp / "pre").itertuples()][: args.clips]
    clips = [(r.clip_id, *load_clip(r)) for r in records]
    cfg = from_dict(FitConfig, {"rank": 4, "alpha": 4.0, "steps": args.steps, "lr": 5e-3, "clips_per_batch": 4})
    n = len(clips)
    layouts = {
        "batch4": [list(range(i, min(i + 4, n))) for i in range(0, n, 4)],
        "batch1": [[i] for i in range(n)],
        "batch3": [list(range(i, min(i + 3, n))) for i in range(0, n, 3)],
        "batch4_shift1": [[0], *[list(range(i, min(i + 4, n))) for i in range(1, n, 4)]],
    }
    fits = {name: _fit(dit, vocab, clips, cfg, b) for name, b in layouts.items()}
    ref = fits["batch4"]
    scale = max(float(t.abs().max()) for i in ref for t in ref[i][0] + ref[i][1])
    report = {"clips": n, "steps": args.steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "max_abs_entry": scale, "layouts": {}}
    for name, fit in fits.items():
        if name == "batch4":
            continue
        abs_diff = max(float((a - b).abs().max()) for i in fit for a, b in zip(fit[i][0] + fit[i][1],
                                                                            ref[i][0] + ref[i][1]))
        rel_dw = []
        for i in fit:
            for (a1, b1), (a0, b0) in zip(zip(fit[i][0], fit[i][1]), zip(ref[i][0], ref[i][1])):
                d1, d0 = b1 @ a1, b0 @ a0
                rel_dw.append(float((d1 - d0).norm() / d0.norm().clamp_min(1e-30)))
        loss_rel = max(abs(fit[i][2] - ref[i][2]) / abs(ref[i][2]) for i in fit)
        report["layouts"][name] = {"max_abs_diff": abs_diff, "max_abs_diff_over_scale": abs_diff / scale,
                                   "max_rel_dw": max(rel_dw), "max_rel_final_loss": loss_rel}
    json.dump(report, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
