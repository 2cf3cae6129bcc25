"""Stage ``synthesize``: write the synthetic MotionX-like dataset (default profile)."""

from __future__ import annotations

from lofa.config import to_dict
from lofa.data.synthetic import SynthConfig, contact_sheet, generate
from lofa.tracking import stage_run
from pipelines._common import section, stage_args, write_metrics


def main() -> None:
    args = stage_args(__doc__, out="data/motionx_synth", metrics="metrics/synthesize.json")
    cfg = SynthConfig.from_params(section(args, "synthetic"))
    with stage_run("synthesize", to_dict(cfg)) as mlflow:
        summary = generate(cfg, args.out, progress=not args.no_progress)
        sheet = contact_sheet(args.out, args.out / "contact_sheet.png")
        run = {"wall_s": summary.pop("wall_s")}  # timings: MLflow and metrics/timings/, not the metrics
        summary = write_metrics(args.metrics, summary, run, counters=("written", "kept"),
                                did_work=summary["written"] > 0)
        mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        mlflow.log_dict(summary, "summary.json")
        mlflow.log_artifact(str(sheet))
    print(summary)


if __name__ == "__main__":
    main()
