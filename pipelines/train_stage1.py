"""Stage ``train_stage1``: the response-map hypernetwork (BCE on |dW/W| > tau).

Over GPUs or processes: ``accelerate launch --multi_gpu --num_processes N -m pipelines.train_stage1``
(CPU: ``torchrun --nproc_per_node N -m pipelines.train_stage1``): data-parallel training with the
global batch split over the processes; rank 0 alone evaluates, writes the metrics and has the tracking run.
"""

from __future__ import annotations

import time

from lofa.artifacts.hypernets import SIDECAR
from lofa.config import from_dict, to_dict
from lofa.env import process_rank
from lofa.hypertrain import Stage1Config, check_shared, evaluate_stage1, summary as train_summary, train_stage1
from lofa.lora import base_weights
from lofa.tracking import log_manifest, stage_run
from lofa.train import RESUMABLE_CHANGES
from pipelines._common import input_key, section, stage_args, write_metrics
from pipelines._hyper import load_base, load_sets


def main() -> None:
    args = stage_args(__doc__, data="data/preprocessed", base="data/base", loras="data/loras",
                      out="data/stage1", metrics="metrics/train_stage1.json")
    cfg = from_dict(Stage1Config, section(args, "train_stage1"), "train_stage1")
    dit, vocab, base_hash = load_base(args.base)
    train_set, heldout = load_sets(args.loras, args.data, vocab)
    check_shared("train_stage1", cfg.model, train_set, params=args.params, loras=args.loras, pre=args.data)
    t0 = time.perf_counter()
    key = input_key("train_stage1", "train_stage1", cfg, {"data": args.data, "base": args.base, "loras": args.loras},
                    drop=tuple(f"train.{k}" for k in RESUMABLE_CHANGES))
    with stage_run("train_stage1", to_dict(cfg), tags={"lofa.base_model_hash": base_hash}) as mlflow:
        log_manifest(mlflow, args.data, "training")
        model, result = train_stage1(cfg, dit, vocab, train_set, args.out, base_hash=base_hash,
                                     logger=lambda step, m: mlflow.log_metrics(m, step=step), input_key=key)
        if process_rank() != 0:  # a multi-process launch: rank 0 evaluates and writes the results
            return
        base = [w.detach().float() for w in base_weights(dit, vocab)]
        held = evaluate_stage1(model, heldout, base, vocab, cfg.loss)
        summary = train_summary(result, held)
        logged = write_metrics(args.metrics, summary, {"seconds": round(time.perf_counter() - t0, 1)})
        mlflow.log_metrics({k: v for k, v in logged.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(args.out / SIDECAR))
    print(summary)


if __name__ == "__main__":
    main()
