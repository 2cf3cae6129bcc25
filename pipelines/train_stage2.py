"""Stage ``train_stage2``: LoRA weights from the prompt, attending to frozen stage-I tokens.

The objective (``train_stage2.loss``, docs/objectives.md): a dW term plus a weight times the
frozen DiT's flow-matching loss with the predicted LoRA; ``train_stage2.model.use_stage1:
false`` is the one-stage ablation.

Over GPUs or processes: ``accelerate launch --multi_gpu --num_processes N -m pipelines.train_stage2``
(CPU: ``torchrun --nproc_per_node N -m pipelines.train_stage2``): data-parallel training with the
global batch split over the processes; rank 0 alone evaluates, writes the metrics and has the
tracking run. The ``evaluate`` stage registers the model, once it has been evaluated.
"""

from __future__ import annotations

import dataclasses
import time

from lofa.config import from_dict, to_dict
from lofa.env import compute_device, process_rank
from lofa.artifacts.hypernets import SIDECAR, load_hypernet, weights_file
from lofa.hypertrain import Stage2Config, check_shared, evaluate_stage2, summary as train_summary, train_stage2
from lofa.lora import base_weights
from lofa.tracking import log_manifest, stage_run
from lofa.train import RESUMABLE_CHANGES
from pipelines._common import input_key, section, stage_args, write_metrics
from pipelines._hyper import load_base, load_sets


def main() -> None:
    args = stage_args(__doc__, data="data/preprocessed", base="data/base", loras="data/loras",
                      stage1="data/stage1", out="data/stage2", metrics="metrics/train_stage2.json",
                      flags={"ablation": "train without stage-I features (the naive one-stage model)"})
    cfg = from_dict(Stage2Config, section(args, "train_stage2"), "train_stage2")
    if args.ablation:  # the "naive" one-stage model: stage II without stage-I features
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, use_stage1=False))
    dit, vocab, base_hash = load_base(args.base)
    dev = compute_device()  # the flow-matching term runs the frozen DiT (and stage I) beside stage II
    dit.to(dev)
    stage1 = load_hypernet(weights_file(args.stage1)).to(dev) if cfg.model.use_stage1 else None
    train_set, heldout = load_sets(args.loras, args.data, vocab)
    check_shared("train_stage2", cfg.model, train_set, params=args.params, loras=args.loras, pre=args.data,
                 stage1=stage1, stage1_file=weights_file(args.stage1))
    t0 = time.perf_counter()
    inputs = {"data": args.data, "base": args.base, "loras": args.loras}
    if stage1 is not None:
        inputs["stage1"] = args.stage1
    key = input_key("train_stage2_naive" if args.ablation else "train_stage2", "train_stage2", cfg, inputs,
                    drop=tuple(f"train.{k}" for k in RESUMABLE_CHANGES))
    with stage_run("train_stage2_naive" if args.ablation else "train_stage2", to_dict(cfg), tags={"lofa.base_model_hash": base_hash}) as mlflow:
        log_manifest(mlflow, args.data, "training")
        model, result = train_stage2(cfg, dit, vocab, stage1, train_set, args.out, base_hash=base_hash,
                                     logger=lambda step, m: mlflow.log_metrics(m, step=step), input_key=key)
        if process_rank() != 0:  # a multi-process launch: rank 0 evaluates and writes
            return
        base = [w.detach().float() for w in base_weights(dit, vocab)]
        held = evaluate_stage2(model, stage1, heldout, base, vocab, dit, cfg)
        summary = train_summary(result, held)
        logged = write_metrics(args.metrics, summary, {"seconds": round(time.perf_counter() - t0, 1)})
        mlflow.log_metrics({k: v for k, v in logged.items() if isinstance(v, (int, float))})
        mlflow.log_artifact(str(args.out / SIDECAR))
    print(summary)


if __name__ == "__main__":
    main()
