"""Prefect flow ``lofa-pipeline``: the stages of ``dvc.yaml``, run as tasks, DVC as the one cache.

It runs the very commands of ``dvc.yaml`` (read from it, in dependency order) and
adds what ``dvc repro`` lacks: retries with exponential backoff on transient failures,
the per-clip fit fanned out over ``--fit-shards`` mapped tasks followed by the stage's
own summarising command, a task runner for many machines (Dask), and Prefect's UI.
DVC decides and records: a stage runs only if ``dvc status <stage>`` says it changed,
and once its command (after its shards) has finished, ``dvc commit`` records it in
``dvc.lock``; the run ends as a DVC experiment named after the flow run (``dvc exp
save``). So ``dvc repro`` after a flow run, or a flow run after ``dvc repro``, finds
nothing to do. ``LOFA_PIPELINE_ID`` is the flow run id, so the stages' MLflow runs share
the tag ``lofa.pipeline``.

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
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run, task_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from lofa.env import setup_env
from pipelines.flow_artifacts import apply_overrides, parse_set, publish_evaluation
from pipelines.orchestration import (Stage, StageFailed, Step, load_stages, plan, read_metrics, record_stage,
                                     run_command, save_experiment, stage_up_to_date)

FLOW_NAME = "lofa-pipeline"
RUNNERS = ("thread", "dask")


def pipeline_plan(root: str | Path = ".", fit_shards: int = 1, shard_stage: str = "fit_loras") -> list[Step]:
    """The steps the flow runs for ``<root>/dvc.yaml``, in order (see :func:`pipelines.orchestration.plan`)."""
    return plan(load_stages(Path(root) / "dvc.yaml"), fit_shards, shard_stage)


def _transient(_task: Any, _run: Any, state: Any) -> bool:
    return not isinstance(state.data, StageFailed) or state.data.transient


def _task_run_name() -> str:
    return task_run.parameters["step"].name


@task(cache_policy=NO_CACHE, task_run_name="dvc-status-{stage.name}")
def stage_current(stage: Stage, root: str) -> bool:
    """DVC's verdict, asked once the upstream stages are recorded: is ``stage`` up to date?"""
    return stage_up_to_date(root, stage.name)


@task(cache_policy=NO_CACHE, task_run_name=_task_run_name, retry_condition_fn=_transient)
def run_step(step: Step, root: str, pipeline_id: str, current: bool) -> dict[str, Any]:
    """Run one step's command in ``root`` unless DVC found its stage ``current``; a whole stage
    is then recorded in ``dvc.lock``. Returns whether it ran, its seconds and its metrics files."""
    t0 = time.perf_counter()
    if not current:
        run_command(step, root, {"LOFA_PIPELINE_ID": pipeline_id}, log=get_run_logger().info)
        if step.shard is None:
            record_stage(root, step.stage.name)
    return {"step": step.name, "ran": not current, "seconds": round(time.perf_counter() - t0, 1),
            "metrics": read_metrics(step, root)}


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=4))
def lofa_pipeline(root: str = ".", fit_shards: int = 1, shard_stage: str = "fit_loras", retries: int = 2,
                  retry_delay_s: float = 10.0, force: bool = False,
                  params: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Run every stage of ``<root>/dvc.yaml`` that DVC finds changed; ``shard_stage`` over
    ``fit_shards`` mapped tasks. ``root`` must be a git + DVC repository.

    A stage waits for the stages producing its deps; independent ones may run at once.
    Retries back off exponentially from ``retry_delay_s``; ``force`` runs every stage whatever
    DVC says (as ``dvc repro --force``). Returns each step's result; the run is saved as the DVC
    experiment named after the flow run. ``params``: dotted overrides of ``params.yaml`` (as
    ``dvc exp run -S``), applied first; the evaluation ends as Prefect artifacts
    (:mod:`pipelines.flow_artifacts`).
    """
    root = str(Path(root).resolve())
    apply_overrides(root, params)
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
        current = False if force else stage_current.submit(step.stage, root, wait_for=upstream)
        if shard_steps:
            shards = base.map(step=shard_steps, root=unmapped(root), pipeline_id=unmapped(pipeline_id),
                              current=unmapped(current), wait_for=upstream)
            futures.update({s.name: f for s, f in zip(shard_steps, shards)})
            upstream, shard_steps = upstream + list(shards), []
        futures[step.name] = base.submit(step, root, pipeline_id, current, wait_for=upstream)
    results = {name: f.result() for name, f in futures.items()}
    save_experiment(root, flow_run.name, load_stages(Path(root) / "dvc.yaml"))
    publish_evaluation(root, pipeline_id)
    return results


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
    p.add_argument("--force", action="store_true", help="run every stage even if DVC finds it up to date")
    p.add_argument("--runner", choices=RUNNERS, default="thread")
    p.add_argument("--dask-address", help="scheduler of an existing Dask cluster (else a local one)")
    p.add_argument("--workers", type=int, default=4, help="steps at once: threads, or local Dask workers")
    p.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value first, as dvc exp run -S (repeatable)")
    args = p.parse_args()
    root = setup_env(Path(args.root))
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    # prefect read its settings at import; take them again now that PREFECT_HOME & co. are set
    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        pipeline = lofa_pipeline.with_options(task_runner=task_runner(args.runner, args.dask_address, args.workers))
        results = pipeline(root=str(root), fit_shards=args.fit_shards, shard_stage=args.shard_stage,
                           retries=args.retries, retry_delay_s=args.retry_delay, force=args.force,
                           params=parse_set(args.set_param))
    for name, res in results.items():
        print(f"{name}: {'ran' if res['ran'] else 'up to date'}, {res['seconds']} s", *res["metrics"])


if __name__ == "__main__":
    main()
