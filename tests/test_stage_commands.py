"""The stage commands the fast tier reaches no other way (``synthesize``, ``train_judge``,
``evaluate``, ``deploy``), run in this process on the smallest world that has every split.

test_pipeline.py runs the same commands as DVC does (subprocesses, bigger world, numbers the
method must reach) in the slow tier; here each command runs once, a few steps per stage, and
the test checks what each one writes: the synthetic clips, the judge artifact, and every
evaluation method with its interval, judge scores, sample strip, table and registered champion.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_resume_keys import run_stage

CLIPS = 24
WORLD = {
    "synthetic": {"preset": "default", "seed": 1, "num_clips": CLIPS, "frames": 9, "height": 32, "width": 32,
                  "num_heldout_combos": 1, "num_heldout_templates": 1},
    "preprocess": {"num_frames": 9, "fps": 8.0, "height": 32, "width": 32, "text_max_length": 16},
    "pretrain_base": {"dit": {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "text_dim": 384},
                      "batch_size": 8, "train": {"max_steps": 4, "lr": 1e-3, "log_every": 2, "ckpt_every": 4}},
    "fit_loras": {"rank": 4, "alpha": 4.0, "steps": 4, "lr": 5e-3, "clips_per_batch": 8},
    "train_stage1": {"model": {"d_model": 32, "num_heads": 2, "num_blocks": 1, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 1},
                     "loss": {"tau": 0.2}, "prompts_per_batch": 4, "matrices_per_lora": 6,
                     "train": {"max_steps": 2, "lr": 1e-3, "log_every": 1, "ckpt_every": 2}},
    "train_stage2": {"model": {"d_model": 32, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4,
                               "text_dim": 384, "stage": 2, "cross_stage1_after": [1]},
                     "prompts_per_batch": 2, "train": {"max_steps": 2, "lr": 1e-3, "log_every": 1, "ckpt_every": 2}},
    "judge": {"clips": 32, "val_clips": 16, "steps": 4, "width": 8, "batch_size": 16},
    "evaluate": {"eval_points": 2, "sample_steps": 2, "batch": 8, "bootstrap": 50, "generalist_steps": 2,
                 "generalist_batch": 4, "ceiling_renders": 1, "ceiling_steps": 2, "num_videos": 1},
    # any evaluation passes this bar; a name of its own, so the alias read below is this test's
    "register": {"name": "lofa-hypernet-stage-commands", "champion_bar": -1.0e6},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every stage command, in dvc.yaml's order, each run once in this process."""
    tmp = tmp_path_factory.mktemp("commands")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(WORLD))
    d = {k: tmp / k for k in ("synth", "pre", "base", "loras", "stage1", "stage2", "judge", "eval")}
    m = {"synthesize": run_stage("synthesize", params, tmp / "metrics" / "synthesize.json", out=d["synth"])}
    m["preprocess"] = run_stage("preprocess", params, tmp / "metrics" / "preprocess.json", root=d["synth"],
                                out=d["pre"])
    m["pretrain_base"] = run_stage("pretrain_base", params, tmp / "metrics" / "pretrain_base.json", data=d["pre"],
                                   out=d["base"])
    trained = {"data": d["pre"], "base": d["base"]}
    m["fit_loras"] = run_stage("fit_loras", params, tmp / "metrics" / "fit_loras.json", out=d["loras"], **trained)
    trained["loras"] = d["loras"]
    m["train_stage1"] = run_stage("train_stage1", params, tmp / "metrics" / "train_stage1.json", out=d["stage1"],
                                  **trained)
    trained["stage1"] = d["stage1"]
    m["train_stage2"] = run_stage("train_stage2", params, tmp / "metrics" / "train_stage2.json", out=d["stage2"],
                                  **trained)
    m["train_judge"] = run_stage("train_judge", params, tmp / "metrics" / "train_judge.json", out=d["judge"])
    m["evaluate"] = run_stage("evaluate", params, tmp / "metrics" / "evaluate.json", synth=d["synth"],
                              naive=tmp / "no_naive", judge=d["judge"], out=d["eval"],
                              plots=tmp / "eval_methods.csv", stage2=d["stage2"], **trained)
    return {"tmp": tmp, "dirs": d, "metrics": m}


def test_synthesize_writes_every_clip_its_meta_and_a_contact_sheet(world: dict) -> None:
    from lofa.data.synthetic import read_meta

    d, m = world["dirs"], world["metrics"]["synthesize"]
    assert m["clips"] == CLIPS and len(read_meta(d["synth"])) == CLIPS
    assert (d["synth"] / "contact_sheet.png").stat().st_size > 1000
    assert world["metrics"]["preprocess"]["clips"] == CLIPS


def test_train_judge_writes_a_judge_that_loads(world: dict) -> None:
    from lofa.data.synthetic import STATED
    from lofa.artifacts.judge import load_judge

    m = world["metrics"]["train_judge"]
    assert set(m["render_val"]) == {f"{a}_acc" for a in STATED} | {"all_acc"}
    assert all(0.0 <= v <= 1.0 for v in m["render_val"].values()), m
    assert list(load_judge(world["dirs"]["judge"]).attributes) == list(STATED)


def test_evaluate_writes_every_method_its_interval_the_judge_and_the_champion(world: dict) -> None:
    import mlflow

    from lofa.data.synthetic import STATED
    from lofa.evaluate import METHODS

    d, m = world["dirs"], world["metrics"]["evaluate"]
    assert set(m["methods"]) == set(METHODS) - {"naive"}  # no naive stage-II export in this world
    for name, r in m["methods"].items():
        assert r["gap_closed_lo"] <= r["gap_closed"] <= r["gap_closed_hi"], (name, r)
        assert {f"judge_{a}_acc" for a in STATED} | {"judge_all_acc"} <= set(r), name
    assert m["methods"]["base"]["gap_closed"] == 0.0 and m["methods"]["oracle"]["gap_closed"] == 1.0
    assert {"dw_cos", "map_f1"} <= set(m["methods"]["ceiling"])
    assert len(list((d["eval"] / "samples").glob("*.gif"))) == 1
    assert "predicted" in (d["eval"] / "table.txt").read_text()
    plots = pd.read_csv(world["tmp"] / "eval_methods.csv")
    assert set(plots["method"]) == set(m["methods"])
    champion = mlflow.MlflowClient().get_model_version_by_alias(WORLD["register"]["name"], "champion")
    assert mlflow.get_run(champion.run_id).data.tags["lofa.stage"] == "evaluate"
    assert champion.tags["champion_passed"] == "true"


def test_deploy_refuses_to_start_without_a_prefect_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Serving the deployment needs a running server (tests/test_prefect_ui.py, slow tier); without
    PREFECT_API_URL the command stops at once and says what to start."""
    from pipelines import deploy

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(sys, "argv", ["deploy", "--root", str(tmp_path)])
    with pytest.raises(SystemExit, match="set PREFECT_API_URL to a running Prefect server"):
        deploy.main()
