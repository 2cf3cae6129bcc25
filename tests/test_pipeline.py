"""Every stage command on a small synthetic world, in order, as DVC runs them (subprocesses).

Numbers the run must reach: fitted LoRAs lower their own clip's loss, the stage
commands resume without redoing work, MLflow holds one run per stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMALL = {
    "synthetic": {"preset": "default", "seed": 1, "num_clips": 48, "frames": 9, "height": 32, "width": 32,
                  "num_heldout_combos": 2, "num_heldout_templates": 1},
    "preprocess": {"num_frames": 9, "fps": 8.0, "height": 32, "width": 32, "text_max_length": 16},
    "pretrain_base": {"dit": {"dim": 96, "ffn_dim": 192, "num_heads": 2, "num_layers": 2, "text_dim": 384},
                      "batch_size": 8, "train": {"max_steps": 60, "lr": 1e-3, "log_every": 20, "ckpt_every": 30}},
    "fit_loras": {"rank": 4, "alpha": 4.0, "steps": 60, "lr": 5e-3, "clips_per_batch": 16},
    "train_stage1": {"model": {"d_model": 64, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 1},
                     "loss": {"tau": 0.2}, "prompts_per_batch": 4, "matrices_per_lora": 6,
                     "train": {"max_steps": 20, "lr": 1e-3, "log_every": 10, "ckpt_every": 10}},
    "train_stage2": {"model": {"d_model": 64, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 2, "cross_stage1_after": [1]},
                     "prompts_per_batch": 2,
                     "train": {"max_steps": 10, "lr": 1e-3, "log_every": 5, "ckpt_every": 5}},
    "judge": {"clips": 200, "val_clips": 50, "steps": 30, "width": 16, "batch_size": 32},
    "evaluate": {"sample_steps": 3, "bootstrap": 300, "generalist_steps": 10, "generalist_batch": 8,
                 "ceiling_renders": 2, "ceiling_steps": 10, "num_videos": 2},
    "register": {"champion_bar": -1.0e6},  # any evaluation passes: the test checks that the alias moves
}
#: The execution key of this module's stage commands (one MLflow parent run, the stage runs nested).
PIPELINE_ID = f"test-pipeline-{os.getpid()}"


def run_stage(stage: str, tmp: Path, **paths: Path) -> dict:
    cmd = [sys.executable, "-m", f"pipelines.{stage}", "--params", str(tmp / "params.yaml"), "--no-progress",
           "--metrics", str(tmp / "metrics" / f"{stage}.json")]
    for k, v in paths.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "LOFA_PIPELINE_ID": PIPELINE_ID}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((tmp / "metrics" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("pipe")
    (tmp / "params.yaml").write_text(yaml.safe_dump(SMALL))
    d = {k: tmp / k for k in ("synth", "pre", "base", "loras", "stage1", "stage2")}
    m = {"synthesize": run_stage("synthesize", tmp, out=d["synth"]),
         "preprocess": run_stage("preprocess", tmp, root=d["synth"], out=d["pre"]),
         "pretrain_base": run_stage("pretrain_base", tmp, data=d["pre"], out=d["base"]),
         "fit_loras": run_stage("fit_loras", tmp, data=d["pre"], base=d["base"], out=d["loras"]),
         "train_stage1": run_stage("train_stage1", tmp, data=d["pre"], base=d["base"], loras=d["loras"],
                                   out=d["stage1"]),
         "train_stage2": run_stage("train_stage2", tmp, data=d["pre"], base=d["base"], loras=d["loras"],
                                   stage1=d["stage1"], out=d["stage2"])}
    return {"tmp": tmp, "dirs": d, "metrics": m}


def test_data_stages(pipeline: dict) -> None:
    m, d = pipeline["metrics"], pipeline["dirs"]
    assert m["synthesize"]["clips"] == 48 and m["preprocess"]["clips"] == 48 and m["preprocess"]["rejected"] == 0
    man = pd.read_parquet(d["pre"] / "manifest.parquet")
    assert set(man["split"]) == {"train", "val", "test"}
    assert list(man["latent_shape"].iloc[0]) == [16, 3, 4, 4]
    assert (d["synth"] / "contact_sheet.png").stat().st_size > 10_000


def test_base_and_fitted_loras(pipeline: dict) -> None:
    m, d = pipeline["metrics"], pipeline["dirs"]
    assert m["pretrain_base"]["steps"] == 60 and (d["base"] / "dit.safetensors").is_file()
    assert len(list((d["base"] / "samples").glob("*.gif"))) == 3
    fit = m["fit_loras"]
    assert fit["clips"] == 48  # every split: training supervision and held-out oracles
    assert fit["share_improved"] >= 0.9 and fit["loss_reduction_median"] > 0.05, fit
    assert (d["loras"] / "plots" / "fit_summary.png").is_file()


def test_hypernetwork_stages(pipeline: dict) -> None:
    s1, s2 = pipeline["metrics"]["train_stage1"], pipeline["metrics"]["train_stage2"]
    assert s1["steps"] == 20 and 0.0 < s1["heldout_f1"] <= 1.0 and s1["heldout_bce"] > 0
    assert s2["steps"] == 10 and s2["heldout_fm"] > 0 and s2["heldout_dw_rel_err"] > 0
    for stage in ("stage1", "stage2"):
        side = json.loads((pipeline["dirs"][stage] / "model.json").read_text())
        assert side["step"] > 0 and side["meta"]["base_model_hash"]


def test_rerun_resumes_without_redoing(pipeline: dict) -> None:
    tmp, d = pipeline["tmp"], pipeline["dirs"]
    victim = sorted((d["loras"] / "loras").glob("*.safetensors"))[0]
    others = {p: p.stat().st_mtime_ns for p in (d["loras"] / "loras").glob("*.safetensors") if p != victim}
    victim.unlink()
    again = run_stage("fit_loras", tmp, data=d["pre"], base=d["base"], out=d["loras"])
    assert again["fitted_now"] == 1 and victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    run_stage("preprocess", tmp, root=d["synth"], out=d["pre"])  # this run's count: in the undeclared timings
    assert json.loads((tmp / "metrics" / "timings" / "preprocess.json").read_text())["encoded_now"] == 0


def test_mlflow_has_one_run_per_stage(pipeline: dict) -> None:
    import mlflow

    runs = mlflow.search_runs(experiment_names=["lofa"])
    stages = set(runs["tags.lofa.stage"])
    assert {"synthesize", "preprocess", "pretrain_base", "fit_loras", "train_stage1", "train_stage2"} <= stages
    fit = runs[runs["tags.lofa.stage"] == "fit_loras"].iloc[0]
    assert fit["metrics.loss_reduction_median"] > 0.05


def _table(client, run_id: str, name: str) -> pd.DataFrame:
    """A table logged with ``mlflow.log_table`` (JSON, pandas' split orientation)."""
    return pd.read_json(client.download_artifacts(run_id, name), orient="split")


def test_stage_runs_nest_under_one_parent_with_the_dataset(pipeline: dict) -> None:
    """Each stage is its own process; they find one parent run by LOFA_PIPELINE_ID and carry its git
    tags; the stages that read the preprocessed manifest log it as their dataset, so does the parent."""
    import mlflow

    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string=f"tags.`lofa.pipeline` = '{PIPELINE_ID}'")
    parent = runs[runs["tags.lofa.role"] == "pipeline"]
    assert len(parent) == 1, runs[["tags.mlflow.runName", "tags.lofa.role"]]
    parent = parent.iloc[0]
    stages = runs[runs["tags.lofa.role"] != "pipeline"]
    assert len(stages) >= 6 and (stages["tags.mlflow.parentRunId"] == parent["run_id"]).all()
    commit = parent["tags.lofa.git_commit"]  # HEAD when the first stage ran (this checkout may move on since)
    assert len(commit) == 40 and subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT).returncode == 0
    assert (stages["tags.lofa.git_commit"] == parent["tags.lofa.git_commit"]).all()
    assert parent["tags.lofa.git_dirty"] in ("true", "false") and parent["status"] == "FINISHED"
    name = parent["tags.mlflow.runName"]  # readable: commit and start time; stages named after it
    assert name.startswith(f"pipeline {parent['tags.lofa.git_commit'][:7]}"), name
    assert set(stages["tags.mlflow.runName"]) >= {f"fit_loras ({name})", f"preprocess ({name})"}
    client = mlflow.MlflowClient()
    digest = {}
    for stage in ("preprocess", "fit_loras", "train_stage1", "train_stage2"):
        run = client.get_run(stages[stages["tags.lofa.stage"] == stage]["run_id"].iloc[0])
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.name == "preprocessed-manifest" and ds.dataset.source_type == "local"
        digest[stage] = ds.dataset.digest
    assert len(set(digest.values())) == 1, digest  # the same manifest bytes
    assert [d.dataset.digest for d in client.get_run(parent["run_id"]).inputs.dataset_inputs] == [digest["fit_loras"]]
    # per-clip fit values as a table (not metric steps), the fit summary through log_figure
    fit = stages[stages["tags.lofa.stage"] == "fit_loras"]["run_id"].iloc[0]
    table = _table(client, fit, "fit_per_clip.json")
    assert len(table) == len(list((pipeline["dirs"]["loras"] / "loras").glob("*.safetensors")))
    assert ((table["final_loss"] < table["base_loss"]) == (table["reduction"] > 0)).all()
    assert "plots/fit_summary.png" in {f.path for f in client.list_artifacts(fit, "plots")}
    assert not client.get_metric_history(fit, "clip_base_loss")


def test_prompt_ceiling_benchmark_on_the_pipeline_outputs(pipeline: dict) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prompt_ceiling

    d, tmp = pipeline["dirs"], pipeline["tmp"]
    report = prompt_ceiling.main(["--base", str(d["base"]), "--loras", str(d["loras"]), "--data", str(d["pre"]),
                                  "--meta", str(d["synth"] / "meta.csv"), "--params", str(tmp / "params.yaml"),
                                  "--steps", "3", "--batch", "2", "--threads", "1", "--out", str(tmp / "ceil.json")])
    m = report["methods"]
    assert set(m) == {"base", "oracle", "same_action_mean", "action_lora", "wrong_action_lora", "all_train_lora"}
    assert m["base"]["gap_closed"] == 0.0 and m["oracle"]["gap_closed"] == 1.0
    assert m["oracle"]["fm_loss"] < m["base"]["fm_loss"]
    assert json.loads((tmp / "ceil.json").read_text())["heldout_clips"] == report["heldout_clips"] > 0


def test_stage_commands_under_two_processes(pipeline: dict) -> None:
    """``torchrun --nproc_per_node 2``: one data-parallel training, rank 0 alone evaluates, writes
    and tracks (one MLflow run per stage, not one per process)."""
    import mlflow

    tmp, d = pipeline["tmp"], pipeline["dirs"]
    group = f"two-processes-{os.getpid()}"
    env = {**os.environ, "LOFA_PIPELINE_ID": group, "OMP_NUM_THREADS": "1"}
    runs = {"train_stage1": {"loras": d["loras"], "out": tmp / "stage1_2p"},
            "train_stage2": {"loras": d["loras"], "stage1": d["stage1"], "out": tmp / "stage2_2p"}}
    for stage, paths in runs.items():
        metrics = tmp / "metrics_2p" / f"{stage}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", f"pipelines.{stage}", "--params", str(tmp / "params.yaml"), "--no-progress",
               "--metrics", str(metrics), "--data", str(d["pre"]), "--base", str(d["base"])]
        for k, v in paths.items():
            cmd += [f"--{k}", str(v)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        summary = json.loads(metrics.read_text())
        assert summary["steps"] == SMALL[stage]["train"]["max_steps"]
        assert ("heldout_f1" if stage == "train_stage1" else "heldout_fm") in summary
        assert (paths["out"] / "model.safetensors").is_file()
        rng = json.loads(next((paths["out"] / "ckpt").glob("step_*/checkpoint.json")).read_text())["rng"]
        assert len(rng) == 2  # both processes trained (their RNG states are in the checkpoint)
    found = mlflow.search_runs(experiment_names=["lofa"], filter_string=f"tags.`lofa.pipeline` = '{group}'")
    parent = found[found["tags.lofa.role"] == "pipeline"]
    found = found[found["tags.lofa.role"] != "pipeline"]
    assert len(parent) == 1 and (found["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]).all()
    assert sorted(found["tags.lofa.stage"]) == ["train_stage1", "train_stage2"]
    assert found["metrics.heldout_f1"].notna().sum() == 1


def test_evaluate_writes_every_method_with_its_interval_and_judge_scores(pipeline: dict) -> None:
    from lofa.data.synthetic import STATED
    from lofa.evaluate import METHODS

    tmp, d = pipeline["tmp"], pipeline["dirs"]
    judge = run_stage("train_judge", tmp, out=tmp / "judge")
    assert set(judge["render_val"]) == {f"{a}_acc" for a in STATED} | {"all_acc"}
    m = run_stage("evaluate", tmp, data=d["pre"], base=d["base"], loras=d["loras"], synth=d["synth"],
                  stage1=d["stage1"], stage2=d["stage2"], naive=tmp / "no_naive", judge=tmp / "judge",
                  out=tmp / "eval", plots=tmp / "eval_methods.csv")
    assert set(m["methods"]) == set(METHODS) - {"naive"}  # no naive stage-II export in this world
    for name, r in m["methods"].items():
        assert {"fm_loss", "gap_closed", "gap_closed_lo", "gap_closed_hi"} <= set(r), name
        assert r["gap_closed_lo"] <= r["gap_closed"] <= r["gap_closed_hi"], (name, r)
        assert {f"judge_{a}_acc" for a in STATED} | {"judge_all_acc", "judge_frechet"} <= set(r), name
    assert m["methods"]["base"]["gap_closed"] == 0.0 and m["methods"]["oracle"]["gap_closed"] == 1.0
    assert m["methods"]["oracle"]["fm_loss"] < m["methods"]["base"]["fm_loss"]
    assert {"dw_cos", "map_f1"} <= set(m["methods"]["ceiling"]) and set(m["judge"]["real"]) == set(judge["render_val"])
    assert len(list((tmp / "eval" / "samples").glob("*.gif"))) == 2
    _check_evaluate_run_and_registration(d, m)


def _check_evaluate_run_and_registration(d: dict, m: dict) -> None:
    """The evaluate run: per-clip losses as a table, the gap figure; the model it evaluated registered
    (base hash on the version) and, passing this world's bar, the champion."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = mlflow.search_runs(experiment_names=["lofa"], filter_string=f"tags.`lofa.pipeline` = '{PIPELINE_ID}'")
    ev = runs[runs["tags.lofa.stage"] == "evaluate"]["run_id"].iloc[0]
    per_clip = _table(client, ev, "eval_per_clip.json")
    assert len(per_clip) == m["clips"]
    # the per-clip mean is the table's fm_loss (float32 losses summed in another order: 1e-5 relative)
    assert per_clip["predicted_fm_loss"].mean() == pytest.approx(m["methods"]["predicted"]["fm_loss"], rel=1e-5)
    assert "figures/gap_closed.png" in {f.path for f in client.list_artifacts(ev, "figures")}
    champion = client.get_model_version_by_alias("lofa-hypernet", "champion")
    base_hash = json.loads((d["base"] / "dit.json").read_text())["base_model_hash"]
    assert champion.run_id == ev and champion.tags["base_model_hash"] == base_hash
    assert champion.tags["champion_passed"] == "true"
    assert float(champion.tags["eval.predicted.gap_closed_lo"]) == pytest.approx(
        m["methods"]["predicted"]["gap_closed_lo"], rel=1e-6)  # str(float) round trip

