"""``kill -9`` of ``dvc repro`` itself, mid-fit and mid-training, then ``dvc repro`` again.

A git + DVC repository holds the repo's code and the first five stages of ``dvc.yaml``
(synthesize -> train_stage1) on tests/test_faults.py's small params. ``dvc repro`` runs in its
own process group, which tests/killing.py SIGKILLs (DVC, the shell and the stage command
together) at an observed point: once a seeded number of LoRAs is written, then (second
``dvc repro``) once a seeded checkpoint step is reached. DVC would delete a stage's outputs
before rerunning it; ``persist: true`` on ``data/loras`` and ``data/stage1`` keeps them, and each
stage resumes from what is there (keyed to its inputs, lofa/inputkey.py). What must hold:

- no finished LoRA is refitted (bytes unchanged; the fit's own ``fitted_now`` counts the rest);
- training resumes from its last checkpoint (the rerun's MLflow loss history starts after it);
- outputs equal the uninterrupted references of tests/test_faults.py within its stated bounds;
- the killed DVC's locks do not block the rerun; ``dvc status`` is clean at the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from killing import kill_at_progress
from lofa.io import load_tensors, read_json
from lofa.lora import load_lora
from test_faults import (DW_REL_TOL, LOSS_REL_TOL, ROOT, SMALL, _check_killed_training, ckpt_step, lora_count,
                         lora_dw_rel_error, max_diff, world)  # noqa: F401  (world: the module fixture)

pytestmark = pytest.mark.slow
STAGES = ("synthesize", "preprocess", "pretrain_base", "fit_loras", "train_stage1")
DVC = str(Path(sys.executable).parent / "dvc")


def _dvc_repo(root: Path) -> dict[str, str]:
    """The repo's code and first five stages in a fresh git + DVC repository; the environment to run it."""
    root.mkdir()
    for name in ("lofa", "pipelines"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    (root / "metrics").mkdir()
    (root / ".venv").symlink_to(Path(sys.executable).parents[1])
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {k: stages[k] for k in STAGES}}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(SMALL))
    (root / ".gitignore").write_text(".venv\nmlflow.db\nmlruns/\n.prefect/\n__pycache__/\n/metrics/timings/\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LOFA_MLFLOW_ARTIFACTS")}
    env.update(PREFECT_HOME=str(root / ".prefect"), OMP_NUM_THREADS="1", TQDM_DISABLE="1", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
    for cmd in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "five"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


def _repro(root: Path, env: dict[str, str], run_id: str, log: Path) -> subprocess.Popen:
    """``dvc repro`` in its own process group; its stages' MLflow runs are tagged ``run_id``."""
    with open(log, "wb") as out:
        return subprocess.Popen([DVC, "repro"], cwd=root, env={**env, "LOFA_PIPELINE_ID": run_id}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _loss_steps(root: Path, run_id: str, stage: str) -> list[int]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lofa").experiment_id],
                              filter_string=f"tags.`lofa.pipeline` = '{run_id}' and tags.`lofa.stage` = '{stage}'")
    assert len(runs) == 1, (run_id, stage, len(runs))
    return sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "loss"))


def _locked_outs(root: Path) -> dict[str, dict]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o for s in lock.values() for o in s.get("outs", [])}


def test_kill_dvc_repro_mid_fit_and_mid_training_then_rerun(world: dict, tmp_path: Path,
                                                           fault_seed_offset: int) -> None:
    root = tmp_path / "repo"
    env = _dvc_repo(root)
    rng = random.Random(20 + fault_seed_offset)
    n_clips, per_batch = len(world["records"]), SMALL["fit_loras"]["clips_per_batch"]
    loras, stage1 = root / "data" / "loras", root / "data" / "stage1"

    # 1. kill the group of `dvc repro` up to one batch (of its own pace) after `target` LoRAs
    target, extra = rng.randint(per_batch + 1, n_clips - 2 * per_batch), rng.uniform(0.0, per_batch)
    log1 = tmp_path / "repro-killed-in-fit.log"
    kill = kill_at_progress(_repro(root, env, "dvc-kill-fit", log1), lambda: lora_count(loras), target, extra,
                            timeout=1200)
    assert kill.killed, f"dvc repro ended (code {kill.code}) before the kill:\n{log1.read_text()[-3000:]}"
    survivors = {p.name: _sha(p) for p in (loras / "loras").glob("*.safetensors")}
    assert target <= len(survivors) < n_clips
    assert "fit_loras" not in yaml.safe_load((root / "dvc.lock").read_text())["stages"]

    # 2. rerun: the fit resumes (persisted outs), then kill mid-train_stage1 after a seeded checkpoint
    train = SMALL["train_stage1"]["train"]
    every, last = train["ckpt_every"], train["max_steps"]
    ckpt_target, ckpt_extra = rng.randrange(every, last - 4 * every + 1, every), rng.uniform(0.0, 2.0 * every)
    log2 = tmp_path / "repro-killed-in-training.log"
    kill2 = kill_at_progress(_repro(root, env, "dvc-kill-train", log2), lambda: ckpt_step(stage1), ckpt_target,
                             ckpt_extra, timeout=1200)
    out2 = log2.read_text()
    assert kill2.killed, f"dvc repro ended (code {kill2.code}) before the kill:\n{out2[-3000:]}"
    assert "Running stage 'fit_loras'" in out2 and "Stage 'pretrain_base' didn't change" in out2, out2[-3000:]
    assert read_json(root / "metrics" / "timings" / "fit_loras.json")["fitted_now"] == n_clips - len(survivors)
    assert all(_sha(loras / "loras" / name) == sha for name, sha in survivors.items())  # not refitted
    resumed_from = _check_killed_training(stage1, last)

    # 3. rerun to the end: training resumes at the checkpoint, nothing upstream reruns
    log3 = tmp_path / "repro-final.log"
    final = _repro(root, env, "dvc-final", log3)
    assert final.wait(timeout=1200) == 0, log3.read_text()[-3000:]
    out3 = log3.read_text()
    assert out3.count("Running stage") == 1 and "Running stage 'train_stage1'" in out3, out3[-3000:]
    expected = [s for s in range(resumed_from + 1, last + 1) if s % train["log_every"] == 0 or s == last]
    assert _loss_steps(root, "dvc-final", "train_stage1") == expected  # started after the checkpoint

    vocab, ref = world["vocab"], world["dirs"]
    assert max_diff(load_tensors(root / "data/base/dit.safetensors"), load_tensors(ref["base"] / "dit.safetensors")) == 0
    names = sorted(p.name for p in (loras / "loras").glob("*.safetensors"))
    assert names == sorted(p.name for p in (ref["loras"] / "loras").glob("*.safetensors"))
    worst_dw = worst_loss = 0.0  # bounds and their grounds: tests/test_faults.py (DW_REL_TOL, LOSS_REL_TOL)
    for name in names:
        lora, want = load_lora(loras / "loras" / name, vocab), load_lora(ref["loras"] / "loras" / name, vocab)
        worst_dw = max(worst_dw, lora_dw_rel_error(lora, want))
        loss, loss0 = float(lora.metadata["fit_final_loss"]), float(want.metadata["fit_final_loss"])
        worst_loss = max(worst_loss, abs(loss - loss0) / abs(loss0))
    assert worst_dw <= DW_REL_TOL and worst_loss <= LOSS_REL_TOL, (worst_dw, worst_loss)
    # training resume is exact (tests/test_faults.py): a lost or repeated step moves weights by ~lr = 1e-3
    diff = max_diff(load_tensors(stage1 / "model.safetensors"), load_tensors(ref["stage1"] / "model.safetensors"))
    assert diff <= 1e-5, diff

    status = subprocess.run([DVC, "status"], cwd=root, env=env, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout + status.stderr
    lora_files = [p for p in (loras).rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]
    assert _locked_outs(root)["data/loras"]["nfiles"] == len(lora_files)  # .tmp- leftovers are .dvcignore'd
    # each killed `dvc repro` left its pid in .dvc/tmp/rwlock; the next one removed it and went on
    for out in (out2, out3):
        assert "had been killed. Auto removed it from the lock file." in out, out[-3000:]
    print(f"dvc repro killed at >= {target} LoRAs (+{kill.waited_s:.2f} s), {len(survivors)} survived; rerun fitted "
          f"{n_clips - len(survivors)}; killed at ckpt >= {ckpt_target} (+{kill2.waited_s:.2f} s), resumed from "
          f"{resumed_from}; dW rel err {worst_dw:.1e}, loss rel err {worst_loss:.1e}, stage-I max |diff| {diff:.1e}")
