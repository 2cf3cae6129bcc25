"""Does the base lack what the per-clip LoRAs teach? (synthetic profile, CPU)

Generates and preprocesses a world of the params' preset (cached under /tmp), pretrains
the base DiT of ``pretrain_base`` on its training clips with the chosen text (``--caption``:
coarse = colour, size, background only; full = the captions the LoRAs are fitted with),
then fits one LoRA per held-out clip (``fit_loras``, full caption, as the pipeline does)
and reports, at the fit's fixed eval timesteps and noise:

  base_loss    flow loss of the base on the clip with its full caption
  oracle_loss  the same with the clip's own fitted LoRA
  gap          (base_loss - oracle_loss) / base_loss: what a per-clip LoRA teaches, relative

A large gap on a world whose caption determines the clip means the base cannot render
what the caption says; the LoRA (and so a hypernetwork that predicts it) must supply it.

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

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lofa.config import from_dict  # noqa: E402
from lofa.data.dataset import load_clips  # noqa: E402
from lofa.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from lofa.data.synthetic import SynthConfig, generate  # noqa: E402
from lofa.fit import FitConfig, derive_seed, fit_batch  # noqa: E402
from lofa.layers import Vocabulary  # noqa: E402
from lofa.pretrain import PretrainConfig, pretrain  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--caption", choices=("coarse", "full"), default="coarse")
    ap.add_argument("--work", type=Path, default=None, help="world + base dir (default /tmp/base_gap/<params>)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="default: pretrain_base.train.max_steps")
    ap.add_argument("--clips", type=int, default=24, help="held-out clips (val + test) to fit")
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
    exclude = tuple(section.pop("exclude_actions", ()))
    keep = [i for i, c in enumerate(train.ids) if c.split("/")[1] not in exclude]
    train = train.subset(keep)
    if args.pretrain_steps:
        section["train"] = {**section["train"], "max_steps": args.pretrain_steps}
    cfg = from_dict(PretrainConfig, section, "pretrain_base")
    if "caption" in {f.name for f in dataclasses.fields(PretrainConfig)}:
        cfg = dataclasses.replace(cfg, caption="full")  # the text was chosen above
    base_dir = work / f"base-{args.caption}-{cfg.train.max_steps}"
    t1 = time.perf_counter()
    dit, result = pretrain(cfg, train, base_dir)
    pretrain_s = time.perf_counter() - t1
    dit.eval().requires_grad_(False)
    held = load_clips(work / "pre", ("val", "test"))
    held = held.subset(list(range(min(args.clips, len(held)))))
    fit = from_dict(FitConfig, params["fit_loras"], "fit_loras")
    vocab = Vocabulary.from_dit_config(cfg.dit)
    bases, finals = [], []
    for s in range(0, len(held), fit.clips_per_batch):
        part = held.subset(list(range(s, min(s + fit.clips_per_batch, len(held)))))
        res = fit_batch(dit, vocab, part.latents, part.text, fit, [derive_seed(fit.seed, c) for c in part.ids])
        bases.append(res.base_loss)
        finals.append(res.final_loss)
    base, final = torch.cat(bases), torch.cat(finals)
    gap = (base - final) / base
    report = {"params": str(args.params), "caption": args.caption, "exclude_actions": list(exclude),
              "train_clips": len(train), "pretrain_steps": result.step, "pretrain_final_loss": result.metrics.get("loss"),
              "pretrain_s": round(pretrain_s, 1), "heldout_clips": len(held), "fit_steps": fit.steps,
              "base_loss": round(float(base.mean()), 4), "oracle_loss": round(float(final.mean()), 4),
              "gap": round(float(gap.mean()), 4), "gap_min": round(float(gap.min()), 4),
              "gap_max": round(float(gap.max()), 4), "seconds": round(time.perf_counter() - t0, 1)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
