"""How much of the latent the flow loss sees does the caption determine? (synthetic profile, CPU)

The flow-matching loss sees the codec's normalised latents (``SynthCodec.encode``: fixed
per-channel MEAN/STD, as preprocess writes them). Over those latents, with V(.) the mean
over latent elements of the variance across clips:

  caption share    1 - V(within groups of clips sharing EVERY stated attribute) / V(total)
  attribute share  1 - V(within groups sharing that one attribute's value) / V(total)
  nuisance share   V(within groups where only that unstated factor varies) / V(total)

``total`` and the attribute shares come from a small world generated and preprocessed
exactly as the pipeline does (``--world`` reuses one; mp4 included). The caption groups are
``render_like`` renders of that world's rows (fresh nuisance, the same stated attributes),
encoded with the same codec; the nuisance groups re-render one row changing one factor
of :class:`lofa.data.figure.Nuisance` only. ``mp4_share`` is the preprocessed latent's
difference from the direct encoding of the same render (the mp4 round trip), also unstated.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/caption_variance.py [--params params.yaml]

Prints JSON (``--out`` writes it too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofa.config import from_dict  # noqa: E402
from lofa.data.dataset import load_clips  # noqa: E402
from lofa.data.figure import NUISANCE_FACTORS, draw_nuisance, render_clip  # noqa: E402
from lofa.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from lofa.data.synthetic import (STATED, SynthConfig, generate, plan, read_meta, render_like,  # noqa: E402
                                 spec_from_labels)
from lofa.encoders.video import SynthCodec  # noqa: E402


def encode(codec: SynthCodec, videos: list[np.ndarray]) -> np.ndarray:
    """uint8 videos (T, H, W, 3) -> normalised latents flattened, (N, D) float64."""
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        return codec.encode(x).flatten(1).double().numpy()


def total_var(x: np.ndarray) -> float:
    """Mean over elements of the variance across rows of ``x`` (N, D), ddof 1."""
    return float(x.var(0, ddof=1).mean())


def within_var(groups: list[np.ndarray]) -> float:
    """Pooled within-group variance (mean over elements), ddof 1 per group; groups of < 2 rows skipped."""
    ss = sum(float(((g - g.mean(0)) ** 2).sum()) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return ss / dof / groups[0].shape[1] if dof else float("nan")


def make_world(params: dict, num_clips: int, work: Path) -> tuple[Path, Path, SynthConfig]:
    """Generate + preprocess a ``num_clips`` world of the params' synthetic preset under ``work``."""
    cfg = SynthConfig.from_params({**params["synthetic"], "num_clips": num_clips})
    root, pre = work / "synth", work / "preprocessed"
    generate(cfg, root, progress=False)
    preprocess(from_dict(PreprocessConfig, params["preprocess"], "preprocess"), root, pre, progress=False)
    return root, pre, cfg


def measure(root: Path, pre: Path, cfg: SynthConfig, groups: int, per_group: int, seed: int) -> dict:
    codec = SynthCodec()
    meta = {r["id"]: r for r in read_meta(root)}
    clips = load_clips(pre, ("train", "val", "test"))
    x = clips.latents.flatten(1).double().numpy()
    rows = [meta[i] for i in clips.ids]
    total = total_var(x)
    out: dict = {"clips": len(rows), "latent_shape": list(clips.latents.shape[1:]), "total_var": round(total, 4)}
    attrs = {}
    for a in STATED:
        values = sorted({r[a] for r in rows})
        attrs[a] = 1 - within_var([x[[i for i, r in enumerate(rows) if r[a] == v]] for v in values]) / total
    out["attribute_share"] = {a: round(v, 4) for a, v in attrs.items()}
    coarse = ("colour", "size", "background")
    keys = sorted({tuple(r[a] for a in coarse) for r in rows})
    out["coarse_share"] = round(1 - within_var(
        [x[[i for i, r in enumerate(rows) if tuple(r[a] for a in coarse) == k]] for k in keys]) / total, 4)

    pick = np.random.default_rng(seed).choice(len(rows), size=min(groups, len(rows)), replace=False)
    planned = {c.id: c.spec for c in plan(cfg)}
    cap_groups, mp4 = [], []
    for k in pick:
        cap_groups.append(encode(codec, render_like(rows[k], per_group, seed + int(k), cfg)))
        direct = encode(codec, [render_clip(planned[rows[k]["id"]], cfg.frames, cfg.height, cfg.width, cfg.fps)])[0]
        mp4.append(float(((direct - x[k]) ** 2).mean()))
    within = within_var(cap_groups)
    out["caption_share"] = round(1 - within / total, 4)
    out["caption_share_rendered_total"] = round(1 - within / total_var(np.concatenate(cap_groups)), 4)
    out["mp4_share"] = round(float(np.mean(mp4)) / total, 4)
    out["caption_share_with_mp4"] = round(1 - (within + float(np.mean(mp4))) / total, 4)

    rng = np.random.default_rng([seed, 5])
    nuisance = {}
    for f in NUISANCE_FACTORS:
        fg = []
        for k in pick:
            spec = spec_from_labels(rows[k], int(rng.integers(2**31)))
            base = draw_nuisance(spec.seed)
            vids = [render_clip(spec, cfg.frames, cfg.height, cfg.width, cfg.fps,
                                dataclasses.replace(base, **{f: getattr(draw_nuisance(int(s)), f)}))
                    for s in rng.integers(2**31, size=per_group)]
            fg.append(encode(codec, vids))
        nuisance[f] = within_var(fg) / total
    out["nuisance_share"] = {f: round(v, 4) for f, v in nuisance.items()}
    out["nuisance_share_sum"] = round(sum(nuisance.values()), 4)
    out["groups"], out["per_group"] = len(pick), per_group
    return out


def strip(root: Path, cfg: SynthConfig, out_png: Path, frames: tuple[int, ...] = (0, 3, 6, 9, 12, 15)) -> Path:
    """A PNG, one row per action (its first clip): rendered frames | the same decoded from the latent."""
    import imageio.v3 as iio

    codec, rows = SynthCodec(), []
    by_action: dict[str, dict] = {}
    for r in read_meta(root):
        by_action.setdefault(r["action"], r)
    planned = {c.id: c.spec for c in plan(cfg)}
    for r in by_action.values():
        v = render_clip(planned[r["id"]], cfg.frames, cfg.height, cfg.width, cfg.fps)
        x = torch.from_numpy(v).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        d = ((codec.decode(codec.encode(x))[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        pick = [t for t in frames if t < cfg.frames]
        gap = np.full((cfg.height, 4, 3), 255, np.uint8)
        rows.append(np.concatenate([*(v[t] for t in pick), gap, *(d[t] for t in pick)], 1))
    iio.imwrite(out_png, np.concatenate(rows, 0).repeat(2, 0).repeat(2, 1))
    return out_png


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--world", type=Path, default=None,
                    help="a dir with synth/ and preprocessed/ (made by this script); made when absent")
    ap.add_argument("--num-clips", type=int, default=120)
    ap.add_argument("--groups", type=int, default=24, help="caption groups (rows of the world)")
    ap.add_argument("--per-group", type=int, default=6, help="renders per caption group")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--strip", type=Path, default=None, help="also write a PNG: rendered | decoded, one row per action")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    params = yaml.safe_load(args.params.read_text())
    world = args.world or Path(f"/tmp/caption_variance/{args.params.stem}-{args.num_clips}")
    root, pre, cfg = make_world(params, args.num_clips, world)
    report = {"params": str(args.params), "world": str(world), "preset": cfg.preset,
              **measure(root, pre, cfg, args.groups, args.per_group, args.seed),
              "seconds": round(time.perf_counter() - t0, 1)}
    if args.strip:
        strip(root, cfg, args.strip)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
