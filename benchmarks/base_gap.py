"""Does the base lack what the per-clip LoRAs teach? (synthetic profile, CPU)

Generates and preprocesses a world of the params' preset (cached under /tmp), pretrains
the base DiT of ``pretrain_base`` on its training clips with the chosen text (``--caption``:
coarse = colour, size, background only; full = the captions the LoRAs are fitted with),
then fits one LoRA per held-out clip (``fit_loras``, full caption, as the pipeline does)
and reports, at the fit's fixed eval timesteps and noise:

  base_loss    flow loss of the base on the clip with its full caption
  oracle_loss  the same with the clip's own fitted LoRA
  gap          (base_loss - oracle_loss) / base_loss: what a per-clip LoRA teaches, relative
  sibling_loss the same with a LoRA fitted (same recipe) on a fresh render of the clip's
               attributes (new nuisance; the mp4 skipped): what its caption alone determines
  caption_share_of_gap  (base - sibling) / (base - oracle), over the clips' mean losses

A large gap whose caption share is high means the base cannot render what the caption
says and the LoRA supplies it: what a hypernetwork reading the caption can predict.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/base_gap.py --caption coarse

Also runs with the first world's code (``--caption full``, a checkout of it on PYTHONPATH):
it only uses APIs both worlds have. Prints JSON (``--out`` writes it too).
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
from lofa.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from lofa.data.figure import ClipSpec, render_clip  # noqa: E402
from lofa.data.synthetic import SynthConfig, generate, read_meta  # noqa: E402
from lofa.encoders.video import SynthCodec  # noqa: E402
from lofa.fit import FitConfig, derive_seed, eval_loss, fit_batch  # noqa: E402
from lofa.layers import Vocabulary  # noqa: E402
from lofa.pretrain import PretrainConfig, pretrain  # noqa: E402
from lofa.wan import load_dit  # noqa: E402

ATTRIBUTES = ("action", "colour", "direction", "speed", "size", "background")  # every attribute both worlds vary


def siblings(rows: list[dict[str, str]], synth: SynthConfig) -> torch.Tensor:
    """Normalised latents (K, 16, T', H', W') of one fresh render per meta row: same attributes, new seed."""
    videos = [render_clip(ClipSpec(**{k: r[k] for k in ATTRIBUTES}, seed=derive_seed("sibling", r["id"]) % 2**31),
                          synth.frames, synth.height, synth.width, synth.fps) for r in rows]
    x = torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    with torch.no_grad():
        return SynthCodec().encode(x)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--caption", choices=("coarse", "full"), default="coarse")
    ap.add_argument("--work", type=Path, default=None, help="world + base dir (default /tmp/base_gap/<params>)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: pretrain_base.train.max_steps")
    ap.add_argument("--clips", type=int, default=24, help="held-out clips (val + test) to fit")
    ap.add_argument("--exclude-actions", nargs="*", default=None,
                    help="actions kept out of pretraining (default: pretrain_base.exclude_actions)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    params = yaml.safe_load(args.params.read_text())
    work = args.work or Path(f"/tmp/base_gap/{args.params.stem}")
    synth = SynthConfig.from_params(params["synthetic"])
    generate(synth, work / "synth", progress=False)
    preprocess(from_dict(PreprocessConfig, params["preprocess"], "preprocess"), work / "synth", work / "pre",
               progress=False)
    train = load_clips(work / "pre", ("train",))
    if args.caption == "coarse":
        if getattr(train, "coarse_text", None) is None:
            raise SystemExit("--caption coarse: the preprocessed clips have no coarse caption")
        train = dataclasses.replace(train, text=train.coarse_text, mask=train.coarse_mask)
    section = dict(params["pretrain_base"])
    section.pop("caption", None)
    exclude = tuple(section.pop("exclude_actions", ()) if args.exclude_actions is None else args.exclude_actions)
    keep = [i for i, c in enumerate(train.ids) if c.split("/")[1] not in exclude]
    train = train.subset(keep)
    if args.pretrain_steps:
        section["train"] = {**section["train"], "max_steps": args.pretrain_steps}
    cfg = from_dict(PretrainConfig, section, "pretrain_base")
    if "caption" in {f.name for f in dataclasses.fields(PretrainConfig)}:
        cfg = dataclasses.replace(cfg, caption="full")  # the text was chosen above
    base_dir = work / f"base-{args.caption}-{cfg.train.max_steps}{''.join('-' + a for a in exclude)}"
    t1 = time.perf_counter()
    if (base_dir / "dit.json").is_file():  # pretrained by an earlier run of this benchmark
        side = json.loads((base_dir / "dit.json").read_text())
        dit = load_dit(base_dir / "dit.safetensors", cfg.dit)
        steps, pre_loss = side["step"], side["metrics"].get("loss")
    else:
        dit, result = pretrain(cfg, train, base_dir)
        steps, pre_loss = result.step, result.metrics.get("loss")
    pretrain_s = time.perf_counter() - t1
    dit.eval().requires_grad_(False)
    meta = {r["id"]: r for r in read_meta(work / "synth")}
    held = load_clips(work / "pre", ("val", "test"))
    held = held.subset(list(range(min(args.clips, len(held)))))
    fit = from_dict(FitConfig, params["fit_loras"], "fit_loras")
    vocab = Vocabulary.from_dit_config(cfg.dit)
    bases, finals, sibs = [], [], []
    for s in range(0, len(held), fit.clips_per_batch):
        part = held.subset(list(range(s, min(s + fit.clips_per_batch, len(held)))))
        seeds = [derive_seed(fit.seed, c) for c in part.ids]
        res = fit_batch(dit, vocab, part.latents, part.text, fit, seeds)
        bases.append(res.base_loss)
        finals.append(res.final_loss)
        sib = fit_batch(dit, vocab, siblings([meta[c] for c in part.ids], synth), part.text, fit, seeds)
        sibs.append(eval_loss(dit, part.latents, part.text, seeds, fit, sib.lora))
    base, final, sib = torch.cat(bases), torch.cat(finals), torch.cat(sibs)
    gap = (base - final) / base
    report = {"params": str(args.params), "caption": args.caption, "exclude_actions": list(exclude),
              "train_clips": len(train), "pretrain_steps": steps, "pretrain_final_loss": pre_loss,
              "pretrain_s": round(pretrain_s, 1), "heldout_clips": len(held), "fit_steps": fit.steps,
              "base_loss": round(float(base.mean()), 4), "oracle_loss": round(float(final.mean()), 4),
              "gap": round(float(gap.mean()), 4), "gap_min": round(float(gap.min()), 4),
              "gap_max": round(float(gap.max()), 4), "sibling_loss": round(float(sib.mean()), 4),
              "caption_share_of_gap": round(float((base.mean() - sib.mean()) / (base.mean() - final.mean())), 4),
              "seconds": round(time.perf_counter() - t0, 1)}
    if exclude:  # the same figures for held-out clips of excluded and of pretrained actions
        out = torch.tensor([c.split("/")[1] in exclude for c in held.ids])
        for name, m in (("excluded", out), ("pretrained", ~out)):
            report[f"{name}_clips"] = int(m.sum())
            report[f"{name}_gap"] = round(float(gap[m].mean()), 4)
            report[f"{name}_caption_share_of_gap"] = round(
                float((base[m].mean() - sib[m].mean()) / (base[m].mean() - final[m].mean())), 4)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
