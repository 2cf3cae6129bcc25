"""Stage ``preprocess``: MotionX-layout videos + captions -> latents, text embeddings, manifest."""

from __future__ import annotations

from lofa.config import from_dict, to_dict
from lofa.data.preprocess import PreprocessConfig, preprocess
from lofa.env import peak_rss_mib
from lofa.io import write_json
from lofa.tracking import log_artifact_if_exists, stage_run
from pipelines._common import section, stage_args


def main() -> None:
    args = stage_args(__doc__, root="data/motionx_synth", out="data/preprocessed",
                      metrics="metrics/preprocess.json")
    cfg = from_dict(PreprocessConfig, section(args, "preprocess"), "preprocess")
    with stage_run("preprocess", to_dict(cfg)) as mlflow:
        summary = preprocess(cfg, args.root, args.out, progress=not args.no_progress)
        summary["peak_rss_mib"] = peak_rss_mib()
        write_json(args.out / "summary.json", summary)
        write_json(args.metrics, summary)
        mlflow.log_metrics({"clips": summary["clips"], "rejected": summary["rejected"],
                            "seconds": summary["seconds"], "peak_rss_mib": summary["peak_rss_mib"],
                            **{f"clips_{s}": n for s, n in summary["per_split"].items()}})
        log_artifact_if_exists(mlflow, args.out / "rejected.csv")
        log_artifact_if_exists(mlflow, args.root / "contact_sheet.png")
        log_artifact_if_exists(mlflow, args.out / "summary.json")
    print(summary)


if __name__ == "__main__":
    main()
