"""Stage ``evaluate``: held-out clips, every method of DESIGN section 6, one table.

Writes ``metrics/evaluate.json`` (dvc metrics), ``metrics/eval_methods.csv``
(dvc plots), and under ``--out`` plots and side-by-side sample videos (base,
oracle, predicted), all logged to one MLflow run with the table.
"""

from __future__ import annotations

import time

import pandas as pd

from lofa.config import from_dict, to_dict
from lofa.data.figure import ACTIONS, COLOURS
from lofa.encoders.video import build_codec
from lofa.evaluate import EvalConfig, compare, judge_scores, method_loras
from lofa.fit_report import collect_curves
from lofa.hypertrain import load_hypernet
from lofa.env import compute_device, peak_rss_mib
from lofa.io import atomic_path, write_json
from lofa.media import decode_latents, side_by_side, write_video
from lofa.tracking import stage_run
from pipelines._common import section, stage_args
from pipelines._hyper import load_base, load_sets


def main() -> None:
    args = stage_args(__doc__, data="data/preprocessed", base="data/base", loras="data/loras", synth="data/motionx_synth",
                      stage1="data/stage1", stage2="data/stage2", naive="data/stage2_naive", out="data/eval",
                      metrics="metrics/evaluate.json", plots="metrics/eval_methods.csv")
    cfg = from_dict(EvalConfig, section(args, "evaluate"), "evaluate")
    t0 = time.perf_counter()
    dit, vocab, base_hash = load_base(args.base)
    train, held = load_sets(args.loras, args.data, vocab)
    dev = compute_device()  # the models run there; the data, LoRAs and the judge stay on the CPU
    dit.to(dev)
    stage1, stage2 = (load_hypernet(d / "model.safetensors").to(dev) for d in (args.stage1, args.stage2))
    naive = load_hypernet(args.naive / "model.safetensors").to(dev) if (args.naive / "model.safetensors").is_file() else None
    loras, predict_s = method_loras(dit, vocab, train, held, stage2, stage1, naive)
    table = compare(dit, vocab, held, loras, cfg)
    curves = [c for c in collect_curves(args.loras / "curves")]
    fit_s = sum(c["batch_seconds"] / c["batch_size"] for c in curves) / len(curves)
    summary = {"clips": len(held), "methods": table,
               "timing": {"predict_ms_per_prompt": 1000 * predict_s, "fit_s_per_clip": fit_s,
                          "fit_over_predict": fit_s / predict_s}}
    videos = {}
    if (args.synth / "meta.csv").is_file():
        meta = pd.read_csv(args.synth / "meta.csv").set_index("id")
        labels = {i: (ACTIONS.index(meta.at[i, "action"]), list(COLOURS).index(meta.at[i, "colour"]))
                  for i in train.clips.ids + held.clips.ids}
        summary["judge"], videos = judge_scores(dit, train, held, loras, labels, (len(ACTIONS), len(COLOURS)), cfg)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["peak_rss_mib"] = peak_rss_mib()
    write_json(args.metrics, summary)
    rows = pd.DataFrame([{"method": m, **r, **summary.get("judge", {}).get(m, {})} for m, r in table.items()])
    with atomic_path(args.plots) as tmp:
        rows.to_csv(tmp, index=False)
    with stage_run("evaluate", to_dict(cfg), tags={"lofa.base_model_hash": base_hash}) as mlflow:
        mlflow.log_table(rows, "eval_table.json")
        mlflow.log_metrics({f"{m}.{k}": v for m, r in table.items() for k, v in r.items()})
        mlflow.log_metrics({f"judge.{m}.{k}": v for m, r in summary.get("judge", {}).items() for k, v in r.items()})
        mlflow.log_metrics({f"timing.{k}": v for k, v in summary["timing"].items()})
        if videos:
            codec = build_codec("synthetic")
            clips = {m: decode_latents(codec, videos[m][:cfg.num_videos]) for m in ("base", "oracle", "predicted")}
            real = decode_latents(codec, held.clips.latents[:cfg.num_videos])
            for i in range(min(cfg.num_videos, len(held))):
                path = write_video(args.out / "samples" / f"heldout_{i}.gif",
                                   side_by_side([real[i]] + [clips[m][i] for m in clips]), upscale=2)
                mlflow.log_artifact(str(path), "samples")
                mlflow.log_text(f"real | base | oracle | predicted\n{held.clips.captions[i]}\n",
                                f"samples/heldout_{i}.txt")
    print(rows.to_string(index=False))


if __name__ == "__main__":
    main()
