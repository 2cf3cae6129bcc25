"""Runs recorded on the GPU machine, brought into the project's MLflow store by mlflow-export-import.

There (``scripts/device_medium.sh``) the stages log to MLflow itself (mlflow-skinny, carried as
wheels: ``scripts/gpu_wheels.sh``) in a local sqlite store, and the script exports its ``lofa``
experiment with the tool's ``export-experiment`` into ``tracking/export/`` of the results archive
(one JSON file per run, its artifacts beside it). Here::

    python -m lofa.device_runs import data_medium/tracking/export

runs the tool's ``import-experiment`` into the ``lofa`` experiment of the project's store (the one
``lofa.env.setup_env`` names), keeping params, metric histories (steps, timestamps), tags,
artifacts and the parent/stage nesting. With ``--import-source-tags`` the tool also keeps each
source run's id, status, start and end time as ``mlflow_exim.run_info.*`` tags; this command then
gives each run its source status and end time back (the tool marks every imported run FINISHED)
and imports only runs not imported before (a later call's archive holds the earlier calls' runs).

mlflow-export-import 1.2.0 writes through the tracking REST API: against a sqlite URI its
``import-experiment`` stops at the second run with "Experiment(name=lofa) already exists" (it
catches only the REST form of that error). So the import talks to ``mlflow server`` over the
project's store, started here on a free loopback port and stopped after; an
``MLFLOW_TRACKING_URI`` that is already ``http(s)://`` is used as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lofa.env import setup_env
from lofa.tracking import EXPERIMENT, experiment_id

#: The tag under which the tool keeps a source run's id (``--import-source-tags``).
SOURCE_ID_TAG = "mlflow_exim.run_info.run_id"
SERVER_START_S = 180  # a busy 2-core host took 13 s; the bound only stops a server that never answers


def export_runs(export_dir: str | Path) -> list[str]:
    """The source run ids of an ``export-experiment`` folder; a clear error if it is not one."""
    manifest = Path(export_dir) / "experiment.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing; not a folder written by mlflow-export-import's "
                                "export-experiment (scripts/device_medium.sh writes tracking/export/)")
    try:
        runs = json.loads(manifest.read_text())["mlflow"]["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{manifest}: not an export-experiment manifest ({e!r})") from None
    missing = [r for r in runs if not (Path(export_dir) / r / "run.json").is_file()]
    if missing:
        raise FileNotFoundError(f"{export_dir}: no run.json for exported run(s) {missing}")
    return list(runs)


def imported_runs(client: Any, exp_id: str, source_ids: list[str]) -> dict[str, Any]:
    """Source run id -> the run (``mlflow.entities.Run``) imported from it into ``exp_id``, where there is one."""
    wanted, found, token = set(source_ids), {}, None
    while True:  # MLflow's search has no IN for tags: every imported run, page by page
        page = client.search_runs([exp_id], f"tags.`{SOURCE_ID_TAG}` LIKE '%'", max_results=1000, page_token=token)
        found |= {r.data.tags[SOURCE_ID_TAG]: r for r in page if r.data.tags[SOURCE_ID_TAG] in wanted}
        token = page.token
        if not token:
            return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def tracking_server(store_uri: str, artifacts: str, log: Path) -> Iterator[str]:
    """``mlflow server`` over ``store_uri`` on a free loopback port, for the block; yields its URL.

    Its own process group, stopped by its id after the block."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--default-artifact-root",
           artifacts, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server over {store_uri} did not start (exit {proc.poll()}); "
                                   f"its log, {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _run_tool(export_dir: Path, uri: str) -> None:
    cmd = [sys.executable, "-m", "mlflow_export_import.experiment.import_experiment", "--experiment-name",
           EXPERIMENT, "--input-dir", str(export_dir), "--import-source-tags", "True"]
    proc = subprocess.run(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mlflow-export-import's import-experiment failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-4000:]}")


def _restore_status(client: Any, runs: dict[str, Any]) -> None:
    """Each imported run's status and end time as on the device (the tool ends every run FINISHED);
    one still RUNNING there when it was exported had its process stopped: KILLED."""
    for run in runs.values():
        tags = run.data.tags
        status, end = tags.get("mlflow_exim.run_info.status"), tags.get("mlflow_exim.run_info.end_time")
        status = "KILLED" if status in ("RUNNING", "SCHEDULED") else status
        if status and status != run.info.status:
            client.set_terminated(run.info.run_id, status, int(end) if end and end != "None" else None)


def _new_runs_only(export_dir: Path, new_ids: list[str], before: dict[str, Any], dest: Path) -> dict[str, str]:
    """Copy into ``dest`` the export of ``new_ids`` alone (its manifest lists just those); returns
    new run -> its parent, for the parents imported before, whose tag is taken out of the copy
    (the tool maps parents only within one import and stops on any other)."""
    manifest = json.loads((export_dir / "experiment.json").read_text())
    manifest["mlflow"]["runs"] = new_ids
    dest.mkdir()
    (dest / "experiment.json").write_text(json.dumps(manifest))
    earlier_parent = {}
    for run_id in new_ids:
        shutil.copytree(export_dir / run_id, dest / run_id)
        run_json = dest / run_id / "run.json"
        run = json.loads(run_json.read_text())
        parent = run["mlflow"]["tags"].get("mlflow.parentRunId")
        if parent in before:
            earlier_parent[run_id] = run["mlflow"]["tags"].pop("mlflow.parentRunId")
            run_json.write_text(json.dumps(run))
    return earlier_parent


def _reattach(client: Any, runs: dict[str, Any], earlier_parent: dict[str, str], before: dict[str, Any]) -> None:
    """Nest each new run under its parent that an earlier import brought."""
    for src, parent in earlier_parent.items():
        client.set_tag(runs[src].info.run_id, "mlflow.parentRunId", before[parent].info.run_id)


def _import_dir(export_dir: Path, exp_id: str, log: Path) -> None:
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        _run_tool(export_dir, uri)
        return
    with tracking_server(uri, mlflow.get_experiment(exp_id).artifact_location, log) as url:
        _run_tool(export_dir, url)


def import_export(export_dir: str | Path) -> dict[str, tuple[Any, bool]]:
    """Import the runs of an ``export-experiment`` folder that are not in the project's ``lofa``
    experiment yet; returns source run id -> (its run here, whether imported now).

    A later call on the same GPU machine exports that machine's whole store again: the runs an
    earlier archive brought are skipped, and new stage runs are nested under their parent even
    when that parent came with the earlier archive."""
    import mlflow

    export_dir = Path(export_dir).resolve()
    source_ids = export_runs(export_dir)
    client = mlflow.MlflowClient()
    exp_id = experiment_id(mlflow)  # created here first, so its artifacts go where the project's go
    before = imported_runs(client, exp_id, source_ids)
    new_ids = [r for r in source_ids if r not in before]
    if new_ids:
        with tempfile.TemporaryDirectory(prefix="lofa-import-") as tmp:
            todo, earlier_parent = export_dir, {}
            if before:
                todo = Path(tmp) / "export"
                earlier_parent = _new_runs_only(export_dir, new_ids, before, todo)
            _import_dir(todo, exp_id, export_dir.parent / "import-server.log")
        runs = imported_runs(client, exp_id, source_ids)
        _restore_status(client, runs)
        _reattach(client, runs, earlier_parent, before)
    runs = imported_runs(client, exp_id, source_ids)
    return {src: (run, src not in before) for src, run in runs.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lofa.device_runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import the GPU machine's exported runs into the project's store")
    imp.add_argument("dir", type=Path, help="an export-experiment folder (data_medium/tracking/export)")
    args = p.parse_args(argv)
    setup_env()
    import mlflow

    try:
        runs = import_export(args.dir)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"lofa.device_runs import: {e}") from None
    for src, (run, new) in sorted(runs.items(), key=lambda kv: kv[1][0].info.start_time):
        print(f"{'imported' if new else 'already imported'}: {run.info.run_name} {run.info.status} "
              f"(lofa.pipeline={run.data.tags.get('lofa.pipeline')}) {src} -> run {run.info.run_id}")
    print(f"experiment '{EXPERIMENT}' at {mlflow.get_tracking_uri()}")


if __name__ == "__main__":
    main()
