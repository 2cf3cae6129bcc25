"""Stage ``preprocess``: MotionX-layout videos + captions -> latents, text embeddings, manifest.

``<out>/summary.json`` and the metrics hold what the data are (counts per split, rejects per
reason); the run's wall time and ``encoded_now`` go to the timings file and MLflow.
"""

from __future__ import annotations

from lofa.config import from_dict, to_dict
from lofa.data.preprocess import PreprocessConfig, preprocess
from lofa.io import write_json
from lofa.tracking import log_artifact_if_exists, log_manifest, stage_run
from pipelines._common import section, stage_args, write_metrics

#: Figures of the run, not of the data: never in ``<out>/summary.json``.
RUN_FIELDS = ("encoded_now", "seconds")


def main() -> None:
    args = stage_args(__doc__, root="data/motionx_synth", out="data/preprocessed",
                      metrics="metrics/preprocess.json")
    cfg = from_dict(PreprocessConfig, section(args, "preprocess"), "preprocess")
    with stage_run("preprocess", to_dict(cfg)) as mlflow:
        result = preprocess(cfg, args.root, args.out, progress=not args.no_progress)
        data = {k: v for k, v in result.items() if k not in RUN_FIELDS}
        write_json(args.out / "summary.json", data)
        summary = write_metrics(args.metrics, {**data, "encoded_now": result["encoded_now"]},
                                {"seconds": result["seconds"]}, counters=("encoded_now",),
                                did_work=result["encoded_now"] > 0)
        mlflow.log_metrics({"clips": summary["clips"], "rejected": summary["rejected"],
                            "seconds": summary["seconds"], "peak_rss_mib": summary["peak_rss_mib"],
                            "encoded_now": result["encoded_now"],
                            **{f"clips_{s}": n for s, n in summary["per_split"].items()}})
        log_manifest(mlflow, args.out, "output")
        log_artifact_if_exists(mlflow, args.out / "rejected.csv")
        log_artifact_if_exists(mlflow, args.root / "contact_sheet.png")
        log_artifact_if_exists(mlflow, args.out / "summary.json")
    print(summary)


if __name__ == "__main__":
    main()
