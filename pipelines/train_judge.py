"""Stage ``train_judge``: the attribute classifier that scores generated videos (synthetic profile).

Renders ``judge.clips`` random clips with the synthetic world's renderer, encodes them as
``preprocess`` does, trains :class:`lofa.judge.Judge`, checks it on fresh renders and writes
``judge.safetensors`` + ``judge.json`` under ``--out``. On the real profile (no renderer) it
writes a sidecar that says so, and ``evaluate`` skips judging.
"""

from __future__ import annotations

import time

from lofa.artifacts.judge import KIND, SIDECAR, save_judge
from lofa.config import from_dict, to_dict
from lofa.data.preprocess import PreprocessConfig, codec_for
from lofa.data.synthetic import SynthConfig
from lofa.env import compute_device
from lofa.io import SCHEMA_VERSION, write_json
from lofa.judge import JudgeConfig, build_judge
from lofa.tracking import stage_run
from pipelines._common import section, stage_args, write_metrics


def main() -> None:
    args = stage_args(__doc__, out="data/judge", metrics="metrics/train_judge.json")
    cfg = from_dict(JudgeConfig, section(args, "judge"), "judge")
    pre = from_dict(PreprocessConfig, section(args, "preprocess"), "preprocess")
    t0 = time.perf_counter()
    if pre.profile != "synthetic":
        reason = f"preprocess.profile is {pre.profile!r}: no renderer, no judge"
        write_json(args.out / SIDECAR, {"schema_version": SCHEMA_VERSION, "kind": KIND, "skipped": reason})
        write_json(args.metrics, {"skipped": reason})
        print(f"train_judge: skipped ({reason})")
        return
    synth = SynthConfig.from_params(section(args, "synthetic"))
    with stage_run("train_judge", to_dict(cfg)) as mlflow:
        judge, report = build_judge(cfg, synth, pre, codec_for(pre), compute_device())
        # wall times go to metrics/timings/ and MLflow, not into declared outputs (issue: stale resume)
        timing = {k: report.pop(k) for k in ("render_s", "train_s")}
        save_judge(args.out, judge, cfg, report)
        timing["seconds"] = round(time.perf_counter() - t0, 1)
        write_metrics(args.metrics, report, timing)
        mlflow.log_metrics({f"render_val.{k}": v for k, v in report["render_val"].items()})
        mlflow.log_metrics(timing)
    print({k: round(v, 3) for k, v in report["render_val"].items()}, f"{timing['seconds']} s")


if __name__ == "__main__":
    main()
