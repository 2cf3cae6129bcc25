"""Stage ``pretrain_base`` (synthetic profile): the tiny Wan DiT the LoRAs personalise.

Over GPUs or processes: ``accelerate launch --multi_gpu --num_processes N -m pipelines.pretrain_base``
(CPU: ``torchrun --nproc_per_node N -m pipelines.pretrain_base``): data-parallel training with the
global batch split over the processes; rank 0 alone samples, writes the metrics and has the tracking run.
"""

from __future__ import annotations

import time

import torch

from lofa.artifacts.base import SIDECAR
from lofa.config import from_dict, to_dict
from lofa.data.dataset import load_clips
from lofa.encoders.video import build_codec
from lofa.env import process_rank
from lofa.media import decode_latents, side_by_side, write_video
from lofa.pretrain import PretrainConfig, import_base, pretrain
from lofa.sampling import sample
from lofa.tracking import log_manifest, stage_run
from lofa.train import RESUMABLE_CHANGES
from pipelines._common import input_key, section, stage_args, write_metrics


def main() -> None:
    args = stage_args(__doc__, data="data/preprocessed", out="data/base", metrics="metrics/pretrain_base.json")
    cfg = from_dict(PretrainConfig, section(args, "pretrain_base"), "pretrain_base")
    key = input_key("pretrain_base", "pretrain_base", cfg, {"data": args.data},
                    drop=tuple(f"train.{k}" for k in RESUMABLE_CHANGES))
    t0 = time.perf_counter()
    if cfg.weights:  # the real profile: Wan2.1's DiT is the base (the clips' latents are not read)
        with stage_run("pretrain_base", to_dict(cfg)) as mlflow:
            import_base(cfg, args.out, input_key=key)
            logged = write_metrics(args.metrics, {"final_loss": None, "steps": 0, "imported": cfg.weights},
                                   {"seconds": round(time.perf_counter() - t0, 1)})
            mlflow.log_metrics({k: float(v) for k, v in logged.items() if isinstance(v, (int, float))})
            mlflow.log_artifact(str(args.out / SIDECAR))
        print(f"pretrain_base: imported {cfg.weights} as the base model ({args.out})")
        return
    clips = load_clips(args.data, ("train",))
    t0 = time.perf_counter()
    with stage_run("pretrain_base", to_dict(cfg)) as mlflow:
        log_manifest(mlflow, args.data, "training")
        dit, result = pretrain(cfg, clips, args.out, logger=lambda step, m: mlflow.log_metrics(m, step=step),
                               input_key=key)
        seconds = time.perf_counter() - t0
        if process_rank() != 0:  # a multi-process launch: rank 0 samples and writes the results
            return
        # samples: three training captions, generated from noise, beside the real clip
        pick = [0, len(clips) // 2, len(clips) - 1]
        gen = sample(dit, clips.text[pick], tuple(clips.latents.shape[1:]), steps=20, guidance=3.0,
                     generator=torch.Generator().manual_seed(0)).cpu()
        codec = build_codec("synthetic")
        real, fake = decode_latents(codec, clips.latents[pick]), decode_latents(codec, gen)
        for i, k in enumerate(pick):
            path = write_video(args.out / "samples" / f"sample_{i}.gif", side_by_side([real[i], fake[i]]), upscale=2)
            mlflow.log_artifact(str(path), "samples")
            mlflow.log_text(clips.captions[k], f"samples/sample_{i}.txt")
        summary = {"final_loss": result.metrics.get("loss"), "steps": result.step}
        logged = write_metrics(args.metrics, summary, {"seconds": round(seconds, 1)})
        mlflow.log_metrics({k: float(v) for k, v in logged.items() if v is not None})
        mlflow.log_artifact(str(args.out / SIDECAR))
    print(summary)


if __name__ == "__main__":
    main()
