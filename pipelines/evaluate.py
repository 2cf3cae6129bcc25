"""Stage ``evaluate``: held-out clips, every method of DESIGN section 6, one table.

Writes ``metrics/evaluate.json`` (dvc metrics: ``methods.<method>`` with fm_loss,
gap_closed and its bootstrap interval, dW / map metrics and judge accuracies),
``metrics/eval_methods.csv`` (dvc plots), and under ``--out`` side-by-side sample
videos (real | base | oracle | predicted) and the printed table (``table.txt``), all logged to
one MLflow run with the per-clip losses as a table, the gap-closed bars as a figure and the
preprocessed manifest as its dataset. Then it registers the evaluated hypernetwork and moves the
``champion`` alias to it when it passes the ``register`` section's bar (:mod:`lofa.serving.registry`).
The caption ceiling and the judge need the synthetic world (``--synth``: meta.csv,
synth.json); on the real profile they are skipped, with a message.
"""

from __future__ import annotations

import time

import pandas as pd

from lofa.artifacts.hypernets import load_hypernet, weights_file
from lofa.artifacts.judge import SIDECAR, load_judge
from lofa.artifacts.loras import CURVES
from lofa.ceiling import ceiling_loras, generalist_lora
from lofa.config import ConfigError, from_dict, to_dict
from lofa.data.preprocess import PreprocessConfig, codec_for
from lofa.data.synthetic import STATED, SynthConfig, read_meta
from lofa.env import compute_device
from lofa.evaluate import (EvalConfig, clip_losses, compare, judge_scores, method_loras, supervision_consistency,
                           table_rows)
from lofa.fit import FitConfig
from lofa.fit_report import collect_curves
from lofa.io import atomic_path, read_json, write_text
from lofa.media import decode_latents, side_by_side, write_video
from lofa.objectives import Stage1LossConfig
from lofa.serving.registry import CHAMPION, RegisterConfig, promote, register_hypernet
from lofa.tracking import log_manifest, model_registry_off, stage_run
from pipelines._common import section, stage_args, write_metrics
from pipelines._hyper import load_base, load_sets


def _world(args, pre: PreprocessConfig) -> tuple[SynthConfig | None, dict[str, dict[str, str]], str]:
    """The synthetic world's config and meta.csv rows by id, or None and why not."""
    if pre.profile != "synthetic" or not (args.synth / "meta.csv").is_file():
        return None, {}, f"no synthetic world ({args.synth / 'meta.csv'} absent or profile {pre.profile!r})"
    synth = from_dict(SynthConfig, read_json(args.synth / "synth.json")["config"], "synth.json")
    return synth, {r["id"]: r for r in read_meta(args.synth)}, ""


def _no_tau(args) -> dict:
    """The evaluate section, which must not set tau: its one source is train_stage1.loss.tau."""
    raw = section(args, "evaluate")
    if "tau" in raw:
        raise ConfigError(f"{args.params}: evaluate.tau is no params key: evaluate reads the response-map "
                          "threshold stage I was trained with, train_stage1.loss.tau; delete evaluate.tau")
    return raw


def _stage1_tau(args) -> float:
    """train_stage1.loss.tau (its default when the section leaves it out, as stage I reads it)."""
    loss = (section(args, "train_stage1").get("loss") or {})
    return from_dict(Stage1LossConfig, loss, "train_stage1.loss").tau


def main() -> None:
    args = stage_args(__doc__, data="data/preprocessed", base="data/base", loras="data/loras",
                      synth="data/motionx_synth",
                      stage1="data/stage1", stage2="data/stage2", naive="data/stage2_naive", judge="data/judge",
                      out="data/eval", metrics="metrics/evaluate.json", plots="metrics/eval_methods.csv")
    cfg = from_dict(EvalConfig, {**_no_tau(args), "tau": _stage1_tau(args)}, "evaluate")
    fit = from_dict(FitConfig, section(args, "fit_loras"), "fit_loras")
    pre = from_dict(PreprocessConfig, section(args, "preprocess"), "preprocess")
    reg = from_dict(RegisterConfig, section(args, "register"), "register")
    t0 = time.perf_counter()
    dit, vocab, base_hash = load_base(args.base)
    train, held = load_sets(args.loras, args.data, vocab)
    dev = compute_device()  # the models run there; the data, LoRAs and the judge stay on the CPU
    dit.to(dev)
    stage1, stage2 = (load_hypernet(weights_file(d)).to(dev) for d in (args.stage1, args.stage2))
    naive_file = weights_file(args.naive)
    naive = load_hypernet(naive_file).to(dev) if naive_file.is_file() else None
    loras, predict_s = method_loras(dit, vocab, train, held, stage2, stage1, naive)
    t_fit = time.perf_counter()
    loras["generalist"] = generalist_lora(dit, vocab, train.clips.latents.to(dev), train.clips.text.to(dev), fit,
                                          cfg.generalist_steps, cfg.generalist_batch).to("cpu")
    synth, meta, why = _world(args, pre)
    if synth is not None:
        loras["ceiling"] = ceiling_loras(dit, vocab, [meta[i] for i in held.clips.ids], held.clips.text, synth, pre,
                                         codec_for(pre), fit, cfg.ceiling_renders,
                                         cfg.ceiling_steps or fit.steps, cfg.seed).to("cpu")
    else:
        print(f"evaluate: caption ceiling skipped: {why}")
    baselines_s = time.perf_counter() - t_fit
    losses = clip_losses(dit, held, loras, cfg)
    table = compare(dit, vocab, held, loras, cfg, losses)
    curves = list(collect_curves(args.loras / CURVES))
    fit_s = sum(c["batch_seconds"] / c["batch_size"] for c in curves) / len(curves)
    # wall times are no result: they go to metrics/timings/ and MLflow, never into the declared
    # metrics (a rerun on identical inputs must leave every DVC hash as it was)
    timing = {"predict_ms_per_prompt": 1000 * predict_s, "fit_s_per_clip": fit_s,
              "fit_over_predict": fit_s / predict_s, "generalist_ceiling_s": round(baselines_s, 1)}
    summary = {"clips": len(held), "methods": table, "config": to_dict(cfg)}
    videos, attributes = {}, []
    judged = synth is not None and "skipped" not in read_json(args.judge / SIDECAR)
    if judged:
        judge = load_judge(args.judge)
        scores, videos = judge_scores(dit, held, loras, judge, [meta[i] for i in held.clips.ids], cfg)
        attributes = [a for a in judge.attributes if f"{a}_acc" in scores["real"]]
        for m, s in scores.items():
            if m in table:
                table[m].update({f"judge_{k}": v for k, v in s.items()})
        summary["judge"] = {"real": scores["real"],
                            "render_val": read_json(args.judge / SIDECAR)["report"]["render_val"]}
    else:
        print("evaluate: judge skipped: " + (why or f"{args.judge / SIDECAR} says it was skipped"))
    if synth is not None:
        summary["supervision"] = supervision_consistency(train, [meta[i] for i in train.clips.ids], STATED)
    write_metrics(args.metrics, summary, {"seconds": round(time.perf_counter() - t0, 1), "timing": timing})
    numbers = pd.DataFrame([{"method": m, **r} for m, r in table.items()])
    with atomic_path(args.plots) as tmp:
        numbers.to_csv(tmp, index=False)
    printed = pd.DataFrame(table_rows(table, attributes))
    write_text(args.out / "table.txt", printed.to_string(index=False) + "\n")
    with stage_run("evaluate", {**to_dict(cfg), "fit_loras": to_dict(fit), "register": to_dict(reg)},
                   tags={"lofa.base_model_hash": base_hash}) as mlflow:
        log_manifest(mlflow, args.data, "evaluation")
        mlflow.log_table(numbers, "eval_table.json")
        mlflow.log_table(_per_clip(held, losses), "eval_per_clip.json")
        mlflow.log_figure(_gap_figure(table), "figures/gap_closed.png")
        mlflow.log_text(printed.to_string(index=False) + "\n", "eval_table.txt")
        mlflow.log_metrics({f"{m}.{k}": v for m, r in table.items() for k, v in r.items()})
        mlflow.log_metrics({f"judge.{g}.{k}": v for g, r in summary.get("judge", {}).items() for k, v in r.items()})
        mlflow.log_metrics({f"timing.{k}": v for k, v in timing.items()})
        mlflow.log_metrics({f"supervision.{k}": v for k, v in summary.get("supervision", {}).items() if v is not None})
        if videos:
            _sample_strips(args, held, videos, cfg, pre, mlflow)
        _register(args, mlflow, table, reg)
    print(printed.to_string(index=False))


def _per_clip(held, losses) -> pd.DataFrame:
    """One row per held-out clip: id, caption, each method's flow loss and the predicted LoRA's share
    of the clip's base -> oracle gap."""
    frame = pd.DataFrame({"clip_id": held.clips.ids, "caption": held.clips.captions,
                          **{f"{m}_fm_loss": l.cpu().numpy() for m, l in losses.items()}})
    if "predicted" in losses:
        gap = (losses["base"] - losses["oracle"]).cpu().numpy()
        frame["predicted_gap_closed"] = (losses["base"] - losses["predicted"]).cpu().numpy() / gap
    return frame


def _gap_figure(table):
    """Bars of each method's share of the gap closed, with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    gap = [table[m]["gap_closed"] for m in methods]
    err = [[g - table[m]["gap_closed_lo"] for m, g in zip(methods, gap)],
           [table[m]["gap_closed_hi"] - g for m, g in zip(methods, gap)]]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(methods) + 1.2))
    ax.barh(methods, gap, xerr=err, color=["C1" if m == "predicted" else "C0" for m in methods])
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set(xlabel="share of the base -> oracle flow-loss gap closed (95% interval)", title="held-out clips")
    fig.tight_layout()
    plt.close(fig)  # log_figure saves it after; closing only drops pyplot's reference
    return fig


def _register(args, mlflow, table, reg: RegisterConfig) -> None:
    """Register the evaluated hypernetwork; the ``champion`` alias moves to it if it passes the bar."""
    why = model_registry_off()
    if why:
        print(f"not registered in the MLflow model registry ({why}); the model is {args.stage2}")
        return
    version = register_hypernet(mlflow, args.stage2, args.stage1, args.params, args.base, name=reg.name)
    passed = promote(mlflow.MlflowClient(), version, table, reg)
    value = table[reg.champion_method][reg.champion_metric]
    print(f"registered {version.name} version {version.version}: {reg.champion_method}.{reg.champion_metric} "
          f"{value:.3f} {'>=' if passed else '<'} {reg.champion_bar}: "
          + (f"alias @{CHAMPION} set" if passed else f"alias @{CHAMPION} left where it was"))


def _sample_strips(args, held, videos, cfg: EvalConfig, pre: PreprocessConfig, mlflow) -> None:
    """real | base | oracle | predicted, one GIF per held-out clip (the first ``num_videos``)."""
    codec = codec_for(pre)  # the synthetic codec runs on the CPU
    shown = [m for m in ("base", "oracle", "predicted") if m in videos]
    clips = {m: decode_latents(codec, videos[m][:cfg.num_videos]) for m in shown}
    real = decode_latents(codec, held.clips.latents[:cfg.num_videos])
    for i in range(min(cfg.num_videos, len(held))):
        path = write_video(args.out / "samples" / f"heldout_{i}.gif",
                           side_by_side([real[i]] + [clips[m][i] for m in shown]), upscale=2)
        mlflow.log_artifact(str(path), "samples")
        mlflow.log_text(f"real | {' | '.join(shown)}\n{held.clips.captions[i]}\n", f"samples/heldout_{i}.txt")


if __name__ == "__main__":
    main()
