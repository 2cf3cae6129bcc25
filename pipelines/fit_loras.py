"""Stage ``fit_loras``: one LoRA per clip on the base DiT (resumable, sharded).

Training clips' LoRAs supervise the hypernetwork; held-out clips' LoRAs are the
oracles that evaluation compares predictions against.

Single process by default; over GPUs or processes:
``accelerate launch --multi_gpu --num_processes N -m pipelines.fit_loras`` (each
process fits every N-th clip; CPU: ``torchrun --nproc_per_node N -m pipelines.fit_loras``).
``--shard-index i --num-shards N`` fits shard i only and writes no summary (the
Prefect flow's fan-out); a plain call afterwards fits any clip left and summarises.

A LoRA is kept only if it was fitted on the same clip content, base model, fit params and
stage code (``lofa.fit.fit_shard``); the others are fitted again, and LoRAs of clips the data
no longer has are deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import pandas as pd
import torch

from lofa.artifacts.base import SIDECAR, WEIGHTS, dit_config_from_sidecar, read_sidecar
from lofa.artifacts.loras import CURVES, drop_orphans
from lofa.config import ConfigError, from_dict, to_dict
from lofa.data.preprocess import load_manifest
from lofa.fit import ClipRecord, FitConfig, fit_shard, fit_shard_distributed
from lofa.fit_report import collect_curves, plot_fit, summarize
from lofa.inputkey import InputKey, code_deps, code_hashes
from lofa.tracking import log_manifest, stage_run
from lofa.wan import load_dit
from pipelines._common import ROOT, section, stage_args, write_metrics


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-index", type=int, help="fit only this shard (with --num-shards); no summary")
    p.add_argument("--num-shards", type=int, help="number of shards (with --shard-index)")


def _per_clip(curves: list[dict], train_ids: set[str]) -> pd.DataFrame:
    """One row per clip (MLflow shows it as a table): its split, eval loss under the base model and
    under its fitted LoRA, and the share of the loss the LoRA removed."""
    return pd.DataFrame([{"clip_id": c["clip_id"], "split": "train" if c["clip_id"] in train_ids else "heldout",
                          "base_loss": c["base_loss"], "final_loss": c["final_loss"],
                          "reduction": 1 - c["final_loss"] / c["base_loss"]} for c in curves])


def _check_text_width(args: argparse.Namespace, text_dim: int, widths: set[int]) -> None:
    """The base DiT reads text of its ``text_dim``; the preprocessed text must have that width
    (else every clip's fit fails inside the DiT's text projection)."""
    if widths != {text_dim}:
        raise ConfigError(f"{args.params}: the base model {args.base / SIDECAR} has config.text_dim {text_dim} "
                          f"(pretrain_base.dit.text_dim) but the text in {args.data} is "
                          f"{'/'.join(map(str, sorted(widths)))}-d "
                          "(the preprocess section's text encoder)")


def main() -> None:
    args = stage_args(__doc__, extra=_shard_options, data="data/preprocessed", base="data/base", out="data/loras",
                      metrics="metrics/fit_loras.json")
    if (args.shard_index is None) != (args.num_shards is None):
        raise SystemExit("fit_loras: --shard-index and --num-shards go together")
    cfg = from_dict(FitConfig, section(args, "fit_loras"), "fit_loras")
    sidecar = read_sidecar(args.base)
    dit_cfg = dit_config_from_sidecar(sidecar)
    manifest = load_manifest(args.data)
    _check_text_width(args, dit_cfg.text_dim, {int(shape[-1]) for shape in manifest["text_shape"]})
    records = [ClipRecord(r.id, str(args.data / r.path), r.caption) for r in manifest.itertuples()]
    # per clip, the LoRA's header records its clip's content hash, the base hash and fit params;
    # the stage's code is the part of the input key common to all clips
    key = InputKey(code=code_hashes(code_deps("fit_loras", ROOT), ROOT))
    if args.num_shards is not None:
        dit = load_dit(args.base / WEIGHTS, dit_cfg, device="cuda" if torch.cuda.is_available() else "cpu")
        report = fit_shard(dit, records, args.out, cfg, shard_index=args.shard_index, num_shards=args.num_shards,
                           base_hash=sidecar["base_model_hash"], progress=not args.no_progress, input_key=key)
        print(json.dumps(dataclasses.asdict(report)))
        return
    t0 = time.perf_counter()
    report = fit_shard_distributed(lambda device: load_dit(args.base / WEIGHTS, dit_cfg, device=device),
                                   records, args.out, cfg, cpu=not torch.cuda.is_available(),
                                   base_hash=sidecar["base_model_hash"], progress=not args.no_progress,
                                   input_key=key)
    if report.shard_index != 0:
        return
    orphans = drop_orphans(args.out, [r.clip_id for r in records])
    if orphans:
        print(f"{args.out}: deleted {len(orphans)} LoRA / curve files of clips no longer in {args.data}")
    curves = collect_curves(args.out / CURVES)
    train_ids = set(load_manifest(args.data, "train")["id"])
    fitted_now = len(report.fitted) * report.num_shards
    summary = {**summarize(curves), "train": summarize([c for c in curves if c["clip_id"] in train_ids]),
               "fitted_now": fitted_now}
    run = {"seconds": round(time.perf_counter() - t0, 1), "clip_steps_per_s": report.clip_steps_per_s}
    logged = write_metrics(args.metrics, summary, run, counters=("fitted_now",), did_work=bool(fitted_now or orphans))
    with stage_run("fit_loras", to_dict(cfg), tags={"lofa.base_model_hash": sidecar["base_model_hash"]}) as mlflow:
        log_manifest(mlflow, args.data, "training")
        mlflow.log_metrics({k: float(v) for k, v in logged.items() if not isinstance(v, dict)})
        mlflow.log_figure(plot_fit(curves, args.out / "plots"), "plots/fit_summary.png")
        mlflow.log_table(_per_clip(curves, train_ids), "fit_per_clip.json")
    print(summary)


if __name__ == "__main__":
    main()
