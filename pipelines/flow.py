"""Prefect flow ``lofa-pipeline``: the stages of ``dvc.yaml``, run as tasks.

It runs the very commands of ``dvc.yaml`` (read from it, in dependency order) and
adds what DVC lacks: retries with exponential backoff on transient failures,
results cached on each stage's inputs (command, deps' content, params values: a
rerun with nothing changed skips the work), the per-clip fit fanned out over
``--fit-shards`` mapped tasks followed by the stage's own summarising command,
a task runner for many machines (Dask), and Prefect's UI. ``LOFA_PIPELINE_ID``
is the flow run id, so the stages' MLflow runs share the tag ``lofa.pipeline``.

    python -m pipelines.flow                                   # no server needed
    python -m pipelines.flow --fit-shards 4 --runner dask      # local Dask cluster
    python -m pipelines.flow --runner dask --dask-address tcp://scheduler:8786
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run, task_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from lofa.env import setup_env
from lofa.orchestration import (StageFailed, Step, fingerprint, load_stages, outs_present, plan, read_metrics,
                                run_command)

FLOW_NAME = "lofa-pipeline"
RUNNERS = ("thread", "dask")


def pipeline_plan(root: str | Path = ".", fit_shards: int = 1, shard_stage: str = "fit_loras") -> list[Step]:
    """The steps the flow runs for ``<root>/dvc.yaml``, in order (see :func:`lofa.orchestration.plan`)."""
    return plan(load_stages(Path(root) / "dvc.yaml"), fit_shards, shard_stage)


def _cache_key(_context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return fingerprint(parameters["step"], parameters["root"])


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    return not isinstance(state.data, StageFailed) or state.data.transient


def _task_run_name() -> str:
    return task_run.parameters["step"].name


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json", task_run_name=_task_run_name,
      retry_condition_fn=_transient)
def run_step(step: Step, root: str, pipeline_id: str) -> dict[str, Any]:
    """Run one step's command in ``root``; its metrics files' content when it has any."""
    t0 = time.perf_counter()
    run_command(step, root, {"LOFA_PIPELINE_ID": pipeline_id}, log=get_run_logger().info)
    return {"step": step.name, "seconds": round(time.perf_counter() - t0, 1), "metrics": read_metrics(step, root)}


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=4))
def lofa_pipeline(root: str = ".", fit_shards: int = 1, shard_stage: str = "fit_loras", retries: int = 2,
                  retry_delay_s: float = 10.0, force: bool = False) -> dict[str, dict[str, Any]]:
    """Run every stage of ``<root>/dvc.yaml``; ``shard_stage`` over ``fit_shards`` mapped tasks.

    A stage waits for the stages producing its deps; independent ones may run at once.
    Retries back off exponentially from ``retry_delay_s``; ``force`` ignores cached results
    (also ignored for a stage whose declared outputs are missing). Returns each step's result.
    """
    root = str(Path(root).resolve())
    pipeline_id = str(flow_run.id)
    delays = exponential_backoff(retry_delay_s)(retries) if retries else 0
    base = run_step.with_options(retries=retries, retry_delay_seconds=delays, retry_jitter_factor=0.2)
    futures: dict[str, PrefectFuture] = {}
    shard_steps: list[Step] = []
    for step in pipeline_plan(root, fit_shards, shard_stage):
        if step.shard:
            shard_steps.append(step)
            continue
        upstream = [futures[u] for u in step.stage.upstream]
        if shard_steps:
            refresh = force or not all(outs_present(s, root) for s in shard_steps)
            shards = base.with_options(refresh_cache=refresh).map(
                step=shard_steps, root=unmapped(root), pipeline_id=unmapped(pipeline_id), wait_for=upstream)
            futures.update({s.name: f for s, f in zip(shard_steps, shards)})
            upstream, shard_steps = upstream + list(shards), []
        refresh = force or not outs_present(step, root)
        futures[step.name] = base.with_options(refresh_cache=refresh).submit(step, root, pipeline_id,
                                                                             wait_for=upstream)
    return {name: f.result() for name, f in futures.items()}


def task_runner(kind: str = "thread", dask_address: str | None = None, workers: int = 4) -> TaskRunner:
    """``thread``: ``workers`` threads of this process; ``dask``: the cluster at ``dask_address``,
    else a local one of ``workers`` single-threaded in-process workers (stages are subprocesses)."""
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": False, "dashboard_address": None})
    raise ValueError(f"task runner {kind!r} is not one of {list(RUNNERS)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="repository root holding dvc.yaml and params.yaml")
    p.add_argument("--fit-shards", type=int, default=1, help="mapped tasks fitting the shard stage")
    p.add_argument("--shard-stage", default="fit_loras", help="the stage whose command takes --shard-index")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--retry-delay", type=float, default=10.0, help="first retry delay (s), doubling")
    p.add_argument("--force", action="store_true", help="run every stage even if its inputs are unchanged")
    p.add_argument("--runner", choices=RUNNERS, default="thread")
    p.add_argument("--dask-address", help="scheduler of an existing Dask cluster (else a local one)")
    p.add_argument("--workers", type=int, default=4, help="steps at once: threads, or local Dask workers")
    args = p.parse_args()
    root = setup_env(Path(args.root))
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    # prefect read its settings at import; take them again now that PREFECT_HOME & co. are set
    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        pipeline = lofa_pipeline.with_options(task_runner=task_runner(args.runner, args.dask_address, args.workers))
        results = pipeline(root=str(root), fit_shards=args.fit_shards, shard_stage=args.shard_stage,
                           retries=args.retries, retry_delay_s=args.retry_delay, force=args.force)
    for name, res in results.items():
        print(f"{name}: {res['seconds']} s", *res["metrics"])


if __name__ == "__main__":
    main()
