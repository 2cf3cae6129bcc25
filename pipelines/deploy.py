"""The Prefect deployment of ``lofa-pipeline``, served by this process (``Flow.serve``).

    prefect server start --host 127.0.0.1 --port 4200 &                       # the API and the UI
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipelines.deploy                                                # serves lofa-pipeline/lofa
    prefect deployment run lofa-pipeline/lofa --param 'params={"fit_loras.steps": 300}'

or "Run" > "Custom run" on the deployment's page in the UI. The deployment's parameters are the
flow's: ``params`` (a dict of dotted overrides of ``params.yaml``, as ``dvc exp run -S`` takes
them; the run starts by writing them into the workspace's ``params.yaml``, so DVC, the stages and
MLflow record the values it ran with, and it ends as the DVC experiment named after the flow run),
``fit_shards``, ``force``, ``retries``, ``retry_delay_s``. Overrides rather than a params-file
path: they show, editable and typed, in the UI's run form and on each flow run, and any key the
stages would reject stops the run before its first stage. One flow run at a time (``limit=1``):
they share one workspace and DVC holds one lock per repository.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lofa.env import setup_env
from pipelines.flow import FLOW_NAME, lofa_pipeline

DEPLOYMENT = "lofa"


def serve(root: Path, name: str = DEPLOYMENT, fit_shards: int = 1) -> None:
    """Register deployment ``lofa-pipeline/<name>`` for the workspace ``root`` and run what is scheduled
    for it until interrupted (Ctrl-C; the deployment is then paused)."""
    from prefect.deployments.runner import EntrypointType

    lofa_pipeline.serve(
        name=name, limit=1, tags=["lofa"], entrypoint_type=EntrypointType.MODULE_PATH,
        parameters={"root": str(root), "fit_shards": fit_shards, "params": {}},
        description=f"The DVC pipeline of {root} as Prefect tasks. params: dotted overrides of params.yaml "
                    '(e.g. {"fit_loras.steps": 300}), applied before the first stage, as dvc exp run -S.')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".", help="the workspace (git + DVC repository) the runs use")
    p.add_argument("--name", default=DEPLOYMENT, help=f"deployment name ({FLOW_NAME}/<name>)")
    p.add_argument("--fit-shards", type=int, default=1, help="the deployment's default fit_shards")
    args = p.parse_args()
    root = setup_env(Path(args.root))
    if not os.environ.get("PREFECT_API_URL"):
        raise SystemExit("pipelines.deploy: set PREFECT_API_URL to a running Prefect server "
                         "(prefect server start; README 'Prefect'): a deployment lives there, where the UI and "
                         "`prefect deployment run` reach it")
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    # prefect read its settings at import; take them again now that PREFECT_HOME & co. are set
    with SettingsContext(profile=get_settings_context().profile, settings=Settings()):
        serve(root, args.name, args.fit_shards)


if __name__ == "__main__":
    main()
