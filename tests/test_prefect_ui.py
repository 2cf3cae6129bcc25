"""Prefect as its users run it: the deployment ``lofa-pipeline/lofa`` served by ``python -m
pipelines.deploy`` against a real ``prefect server``, a run of it triggered with ``prefect deployment
run`` and a params override, on a tiny pipeline; then Prefect's UI in headless Chromium shows the
deployment, the evaluation table artifact and the link artifact, and the link opens the evaluate
run in a real MLflow UI.

Screenshots go to ``out/prefect_ui/`` (or ``$LOFA_UI_SHOTS``); docs/screenshots/prefect_*.png are
copies from one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from servers import free_port, wait_http
from test_flow import stop, tiny_workspace
from test_mlflow_ui import CHROMIUM, chromium, keep_screenshots, page_text

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 2400  # a hang guard for the tiny pipeline: 6.3 min seen on a crowded 2-core host


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(what: str, probe, timeout: float, procs: list[subprocess.Popen]):
    """``probe()`` until it returns something truthy (bounded); fails early if a server exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited with {p.returncode} while waiting for {what}"
        found = probe()
        if found:
            return found
        time.sleep(2)
    raise TimeoutError(f"{what}: not within {timeout} s")


def _prefect_state(api: str):
    """Readers of the server's deployment, flow runs and artifacts (Prefect's own client)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter,
                                                DeploymentFilterId)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    def deployment():
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
            try:
                return c.read_deployment_by_name("lofa-pipeline/lofa")
            except Exception:  # ObjectNotFound until the serve process has registered it
                return None

    def flow_runs(dep_id):
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
            return c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep_id])))

    def artifacts(run_id):
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as c:
            return c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    return deployment, flow_runs, artifacts


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 900)  # the run's guard plus servers, browser and checks
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_deployment_run_shows_evaluation_artifacts_in_the_ui(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    ws = tiny_workspace(tmp_path / "ws")
    pport, mport = free_port(), free_port()
    api, mlflow_ui = f"http://127.0.0.1:{pport}/api", f"http://127.0.0.1:{mport}"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect_home"), "PREFECT_API_URL": api,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "LOFA_MLFLOW_ARTIFACTS": (tmp_path / "mlruns").as_uri(),
           "LOFA_MLFLOW_UI": mlflow_ui}
    bin_dir = Path(sys.executable).parent
    procs = [_start([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pport),
                     "--analytics-off"], env, tmp_path / "prefect.log")]
    try:
        wait_http(f"{api}/health", procs[0], timeout=180)
        procs.append(_start([sys.executable, "-m", "pipelines.deploy", "--root", str(ws)], env, tmp_path / "serve.log"))
        deployment, flow_runs, artifacts = _prefect_state(api)
        dep = _wait_for("the served deployment", deployment, 300, procs)
        assert {"params", "root", "fit_shards", "force"} <= set(dep.parameter_openapi_schema["properties"])
        assert dep.parameters["root"] == str(ws)
        started = subprocess.run([str(bin_dir / "prefect"), "deployment", "run", "lofa-pipeline/lofa", "--params",
                                  json.dumps({"params": {"fit_loras.steps": "12"}})], cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr

        def finished():
            runs = flow_runs(dep.id)
            return runs[0] if runs and runs[0].state.is_final() else None

        run = _wait_for("the flow run of the deployment", finished, RUN_TIMEOUT_S, procs)
        assert run.state.is_completed(), f"{run.state}\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
        arts = {a.key: a for a in artifacts(run.id)}

        # the override reached params.yaml, DVC's experiment and the stage's MLflow run
        assert yaml.safe_load((ws / "params.yaml").read_text())["fit_loras"]["steps"] == 12
        store = MlflowClient(env["MLFLOW_TRACKING_URI"])
        exp_id = store.get_experiment_by_name("lofa").experiment_id
        fit = store.search_runs([exp_id], f"tags.`lofa.stage` = 'fit_loras' and tags.`lofa.pipeline` = '{run.id}'")
        assert len(fit) == 1 and fit[0].data.params["steps"] == "12"

        # the table artifact holds evaluate.json's numbers, one row per method
        table = arts["lofa-evaluation"]
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())["methods"]
        assert [r["method"] for r in rows] == list(metrics)
        for r in rows:  # rounded to 4 decimals in the artifact
            m = metrics[r["method"]]
            assert r["gap_closed"] == pytest.approx(m["gap_closed"], abs=5e-5)
            assert r["lo"] == pytest.approx(m["gap_closed_lo"], abs=5e-5)
            assert r["hi"] == pytest.approx(m["gap_closed_hi"], abs=5e-5)
            assert r["fm_loss"] == pytest.approx(m["fm_loss"], abs=5e-5)
        # the link artifact: this flow run's evaluate run in the MLflow UI
        link = arts["lofa-evaluation-mlflow-run"].data
        ev = store.search_runs([exp_id], f"tags.`lofa.stage` = 'evaluate' and tags.`lofa.pipeline` = '{run.id}'")
        assert len(ev) == 1
        url = f"{mlflow_ui}/#/experiments/{exp_id}/runs/{ev[0].info.run_id}"
        assert url in link

        procs.append(_start([str(bin_dir / "mlflow"), "server", "--backend-store-uri", env["MLFLOW_TRACKING_URI"],
                             "--default-artifact-root", env["LOFA_MLFLOW_ARTIFACTS"], "--host", "127.0.0.1",
                             "--port", str(mport), "--workers", "1"], env, tmp_path / "mlflow.log"))
        wait_http(f"{mlflow_ui}/health", procs[-1], timeout=180)
        base = api.removesuffix("/api")
        pages = {"deployment": f"{base}/deployments/deployment/{dep.id}",
                 "flow_run": f"{base}/runs/flow-run/{run.id}?tab=Parameters",
                 "table": f"{base}/artifacts/artifact/{table.id}",
                 "link": f"{base}/artifacts/artifact/{arts['lofa-evaluation-mlflow-run'].id}",
                 "mlflow_run": url}
        texts = {name: page_text(chromium(tmp_path, page, "--dump-dom")) for name, page in pages.items()}
        for name, page in pages.items():
            chromium(tmp_path, page, f"--screenshot={tmp_path / f'{name}.png'}")
    finally:
        for p in reversed(procs):
            stop(p)

    assert "lofa-pipeline" in texts["deployment"] and "lofa" in texts["deployment"], texts["deployment"][:3000]
    assert '"params" : { "fit_loras.steps" : "12" }' in texts["flow_run"], texts["flow_run"][:3000]
    table_text = texts["table"]
    assert "lofa-evaluation" in table_text and "gap_closed" in table_text, table_text[:3000]
    assert all(m in table_text for m in metrics) and f"{rows[0]['fm_loss']}" in table_text, table_text[:3000]
    assert "MLflow run evaluate" in texts["link"], texts["link"][:3000]
    assert "evaluate" in texts["mlflow_run"] and f"lofa.pipeline : {run.id}" in texts["mlflow_run"], \
        texts["mlflow_run"][:3000]
    keep_screenshots(tmp_path, pages, "prefect", capsys)


# ---------------------------------------------------------------- the flow's parameters and artifacts, no server

def test_params_overrides_are_applied_like_dvc_exp_run_set(tmp_path: Path) -> None:
    from pipelines.flow_artifacts import apply_overrides

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"fit_loras": {"steps": 150, "train": {"lr": 0.002}}, "evaluate": {"batch": 16}}, sort_keys=False))
    assert apply_overrides(tmp_path, None) == {}
    applied = apply_overrides(tmp_path, {"fit_loras.steps": "300", "fit_loras.train.lr": 1e-3, "evaluate.batch": 8})
    assert applied == {"fit_loras.steps": 300, "fit_loras.train.lr": 1e-3, "evaluate.batch": 8}  # "300" read as YAML
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == \
        {"fit_loras": {"steps": 300, "train": {"lr": 1e-3}}, "evaluate": {"batch": 8}}
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(KeyError, match=r"params\.yaml: no key 'fit_loras\.stepz'; keys of fit_loras: \['steps', 'train'\]"):
        apply_overrides(tmp_path, {"fit_loras.stepz": 1})
    with pytest.raises(KeyError, match=r"no section 'fitloras' for override 'fitloras\.steps'"):
        apply_overrides(tmp_path, {"fitloras.steps": 1})
    assert (tmp_path / "params.yaml").read_text() == before  # nothing written on a bad key


def test_evaluation_rows_carry_each_method_and_its_interval() -> None:
    from pipelines.flow_artifacts import evaluation_rows

    m = {"gap_closed": 0.06779432, "gap_closed_lo": 0.05562102, "gap_closed_hi": 0.07996826, "fm_loss": 0.86994284,
         "dw_cos": 0.19}
    rows = evaluation_rows({"clips": 72, "methods": {"predicted": m, "base": {**m, "gap_closed": 0.0}}})
    assert rows == [{"method": "predicted", "gap_closed": 0.0678, "lo": 0.0556, "hi": 0.08, "fm_loss": 0.8699},
                    {"method": "base", "gap_closed": 0.0, "lo": 0.0556, "hi": 0.08, "fm_loss": 0.8699}]


def test_cli_set_param_pairs() -> None:
    from pipelines.flow_artifacts import parse_set

    assert parse_set(["fit_loras.steps=300", "preprocess.profile=wan=x"]) == \
        {"fit_loras.steps": "300", "preprocess.profile": "wan=x"}
    with pytest.raises(SystemExit, match=r"-S takes KEY=VALUE .* not \['steps', '=3'\]"):
        parse_set(["steps", "=3", "a.b=1"])
