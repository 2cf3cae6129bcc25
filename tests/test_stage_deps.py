"""dvc.yaml's code deps against each stage's import closure (pipelines/stagedeps.py, statically: ast, no
import), and the values stages share checked where they are consumed (lofa.hypertrain.check_shared).

A stale dep (declared, never imported) fails as a missing one does: DVC reruns the stage on its
every change and lofa/inputkey.py discards the stage's checkpoints and LoRAs for it, which on the
real profile costs GPU hours for nothing; the message lists the lines to delete.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from tiny_artifacts import DIT, PARAMS, RANK, hypernet_config, write_base, write_hypernet

from lofa.artifacts.hypernets import load_hypernet
from lofa.artifacts.loras import LoRASet
from lofa.config import ConfigError
from lofa.data.dataset import ClipSet
from lofa.hypertrain import check_shared
from lofa.layers import Vocabulary
from pipelines.orchestration import PipelineError
from pipelines.stagedeps import check_stages, entry_module, import_closure, report

ROOT = Path(__file__).resolve().parents[1]
STAGES = check_stages(ROOT)


@pytest.mark.parametrize("deps", STAGES, ids=[d.stage for d in STAGES])
def test_stage_declares_what_it_imports(deps):
    assert not deps.missing, report(deps)


@pytest.mark.parametrize("deps", STAGES, ids=[d.stage for d in STAGES])
def test_stage_declares_nothing_it_does_not_import(deps):
    assert not deps.stale, report(deps)


def test_closures_hold_the_files_the_issue_found_undeclared():
    """Issue 22: train_stage1 imports lofa/lora.py (its target), evaluate lofa/hypernet.py; and
    evaluate runs lofa/serving/mlflow_model.py by path (MLflow's model from code), not by import."""
    by_stage = {d.stage: d for d in STAGES}
    assert "lofa/lora.py" in by_stage["train_stage1"].closure
    assert {"lofa/hypernet.py", "lofa/serving/mlflow_model.py"} <= set(by_stage["evaluate"].closure)
    assert by_stage["train_stage2_naive"].entry == "pipelines.train_stage2"  # `-m` read past --ablation's place
    assert all("lofa/tracking.py" not in d.closure for d in STAGES)  # RECORDING: run records only


def _project(root: Path, files: dict[str, str], deps: list[str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    lines = "".join(f"      - {d}\n" for d in deps)
    (root / "dvc.yaml").write_text(f"stages:\n  s:\n    cmd: python -m pipelines.run --x 1\n    deps:\n{lines}"
                                   "      - data/in\n    outs:\n      - data/out\n")


FILES = {
    "lofa/__init__.py": '"""doc"""\n__version__ = "1"\n',  # declarative: walked, not required
    "lofa/sub/__init__.py": "from lofa.sub.inner import thing\n",
    "lofa/sub/inner.py": "import numpy\nthing = 1\n",
    "lofa/a.py": "from . import b\nfrom .sub import inner\n",
    "lofa/b.py": "def f():\n    from lofa.lazy import g  # runs when f does\n    return g\n",
    "lofa/lazy.py": "from pathlib import Path\nCODE = Path(__file__).with_name('run_by_path.py')\n",
    "lofa/run_by_path.py": "import lofa.c\n",
    "lofa/c.py": "X = 1\n",
    "lofa/unused.py": "import lofa.a\n",
    "pipelines/__init__.py": "",
    "pipelines/run.py": "import os\n\ndef main():\n    import lofa.a\n",
}


def test_closure_follows_lazy_relative_init_and_by_path_imports(tmp_path):
    _project(tmp_path, FILES, [])
    assert import_closure("pipelines.run", tmp_path) == {
        "pipelines/__init__.py", "pipelines/run.py", "lofa/__init__.py", "lofa/a.py", "lofa/b.py",
        "lofa/sub/__init__.py", "lofa/sub/inner.py", "lofa/lazy.py", "lofa/run_by_path.py", "lofa/c.py"}


def test_missing_and_stale_deps_are_named(tmp_path):
    """A directory dep covers the files under it; a declarative __init__.py needs no dep, one
    with code does; the message names the stage and the files."""
    files = {**FILES, "pipelines/__init__.py": "import os\nos.environ.setdefault('X', '1')\n"}
    _project(tmp_path, files, ["pipelines/run.py", "lofa/a.py", "lofa/b.py", "lofa/sub", "lofa/unused.py"])
    [deps] = check_stages(tmp_path)
    assert deps.missing == ("lofa/c.py", "lofa/lazy.py", "lofa/run_by_path.py", "pipelines/__init__.py")
    assert deps.stale == ("lofa/unused.py",)
    assert report(deps).splitlines() == [
        "dvc.yaml: stage s (pipelines.run) imports files its deps do not list: lofa/c.py, lofa/lazy.py, "
        "lofa/run_by_path.py, pipelines/__init__.py",
        "dvc.yaml: stage s (pipelines.run) lists code deps it never imports: lofa/unused.py"]


def test_a_stage_without_python_m_is_refused():
    with pytest.raises(PipelineError, match=r"stage s: cmd 'bash run.sh' runs no 'python -m <module>'"):
        entry_module("bash run.sh", "s")


# --------------------------------------------------------------------------- values stages share


def _lora_set(rank: int, text_dim: int) -> LoRASet:
    """Two clips' fitted LoRAs over the tiny DiT's vocabulary (zeros: only shapes are checked)."""
    vocab, n = Vocabulary.from_dit_config(DIT), 2
    clips = ClipSet(["a", "b"], ["x", "y"], ["train", "train"], torch.zeros(n, 16, 1, 2, 2),
                    torch.zeros(n, 3, text_dim), torch.ones(n, 3, dtype=torch.bool))
    return LoRASet(clips, tuple(torch.zeros(n, rank, m.in_features) for m in vocab),
                   tuple(torch.zeros(n, m.out_features, rank) for m in vocab))



@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory) -> Path:
    """A stage-I export (safetensors + sidecar) as train_stage1 writes it, d_model 32, text_dim 384."""
    out = tmp_path_factory.mktemp("stage1")
    write_hypernet(out, hypernet_config(1), "hash")
    return out / "model.safetensors"


def _check(model, data, **kw) -> None:
    check_shared("train_stage2", model, data, params="p.yaml", loras="data/loras", pre="data/pre", **kw)


def test_matching_shared_values_pass(stage1_file):
    _check(hypernet_config(2), _lora_set(RANK, 384), stage1=load_hypernet(stage1_file), stage1_file=stage1_file)


@pytest.mark.parametrize("change, data, message", [
    ({"rank": RANK + 1}, (RANK, 384), rf"p\.yaml: train_stage2\.model\.rank is {RANK + 1} but the LoRAs in data/loras "
                                      rf"have rank {RANK} \(fit_loras\.rank\)"),
    ({}, (RANK, 256), r"p\.yaml: train_stage2\.model\.text_dim is 384 but the text in data/pre is 256-d"),
])
def test_rank_and_text_width_mismatches_name_the_keys(change, data, message):
    with pytest.raises(ConfigError, match=message):
        _check(dataclasses.replace(hypernet_config(2), **change), _lora_set(*data))


def test_stage2_refuses_a_stage1_of_other_dimensions(stage1_file):
    """Stage II's cross-attention reads stage-I tokens of width d_model, from the same text: both
    must be the sidecar's; both mismatches in one message, naming the sidecar and the field."""
    model = dataclasses.replace(hypernet_config(2), d_model=64, text_dim=256)
    sidecar = stage1_file.with_suffix(".json")
    with pytest.raises(ConfigError) as e:
        _check(model, _lora_set(RANK, 256), stage1=load_hypernet(stage1_file), stage1_file=stage1_file)
    assert str(e.value) == (
        f"p.yaml: train_stage2.model.d_model is 64 but {sidecar} has meta.hypernet.d_model 32 (stage II attends "
        f"to the stage-I tokens); train_stage2.model.text_dim is 256 but {sidecar} has meta.hypernet.text_dim 384 "
        "(stage II attends to the stage-I tokens)")


def test_a_stage2_model_given_as_stage1_is_refused(tmp_path):
    write_hypernet(tmp_path, hypernet_config(2), "hash")
    with pytest.raises(ConfigError, match=r"model\.json is no stage-I model \(meta\.hypernet\.stage 2\)"):
        _check(hypernet_config(2), _lora_set(RANK, 384), stage1=load_hypernet(tmp_path / "model.safetensors"),
               stage1_file=tmp_path / "model.safetensors")


@pytest.mark.slow  # one stage command in a subprocess (its imports take seconds)
def test_fit_loras_refuses_text_of_another_width_than_the_base(tmp_path):
    """The base DiT (text_dim 384 in dit.json) and a manifest whose text is 256-d: the stage
    stops before fitting anything, naming both files and the keys."""
    write_base(tmp_path / "base")
    (tmp_path / "pre").mkdir()
    pd.DataFrame({"id": ["c0"], "split": ["train"], "caption": ["x"], "path": ["clips/c0.safetensors"],
                  "text_shape": [[16, 256]]}).to_parquet(tmp_path / "pre" / "manifest.parquet")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    proc = subprocess.run([sys.executable, "-m", "pipelines.fit_loras", "--params", str(tmp_path / "params.yaml"),
                           "--data", str(tmp_path / "pre"), "--base", str(tmp_path / "base"), "--out",
                           str(tmp_path / "loras"), "--metrics", str(tmp_path / "m.json"), "--no-progress"],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lofa.config.ConfigError: {tmp_path / 'params.yaml'}: the base model {tmp_path / 'base' / 'dit.json'} has "
        f"config.text_dim 384 (pretrain_base.dit.text_dim) but the text in {tmp_path / 'pre'} is 256-d "
        "(the preprocess section's text encoder)")
    assert not (tmp_path / "loras").exists()
