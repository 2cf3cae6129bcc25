"""The ``lofa`` command on tiny artifact directories: exit codes, outputs, error messages.

``predict`` and the error paths run as real subprocesses (``python -m lofa.cli``);
``generate`` and ``refine`` call ``lofa.cli.main`` in this process (the same code,
without paying the model imports once per command).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from lofa import fit
from lofa.artifacts.base import load_base
from lofa.artifacts.loras import lora_path
from lofa.cli import main
from lofa.config import from_dict
from lofa.io import load_tensors, read_json, read_metadata, save_tensors
from lofa.layers import Vocabulary
from lofa.lora import load_lora
from tiny_artifacts import CAPTION, CLIP_ID, DIT, PARAMS, RANK, write_artifacts, write_clip

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red figure waves quickly"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return write_artifacts(tmp_path_factory.mktemp("art"))


def _models(art, hypernets: bool = True) -> list[str]:
    names = ("base", "stage1", "stage2", "params") if hypernets else ("base", "params")
    return [x for n in names for x in (f"--{n}", str(art[n]))]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "lofa.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


@pytest.mark.slow  # a `python -m lofa.cli` subprocess (~8 s); test_hostile runs `lofa predict` in-process
def test_predict_subprocess_writes_one_file_per_prompt(art, tmp_path):
    out = tmp_path / "loras"
    r = _run("predict", PROMPT, "un danseur saute 🙂", "-o", str(out), *_models(art))
    assert r.returncode == 0, r.stderr
    vocab = Vocabulary.from_dit_config(DIT)
    for i, prompt in enumerate((PROMPT, "un danseur saute 🙂")):
        path = out / f"lora_{i:03d}.safetensors"
        assert f"{path}: rank {RANK}, 16 matrices" in r.stdout
        lora = load_lora(path, vocab)
        assert lora.rank == RANK and lora.metadata["prompt"] == prompt
    assert "predicted 2 LoRA(s) in" in r.stdout and "Loaded model" not in r.stdout


def test_errors_name_the_problem(art, tmp_path):
    cases = [
        (("predict", "  ", "-o", str(tmp_path / "x.safetensors")), 2, "lofa predict: error: the prompt is empty"),
        (("predict", PROMPT, *_models(art), "--stage2", str(tmp_path / "nope")), 2,
         f"{tmp_path / 'nope'}: stage2 directory not found"),
        (("predict", "a", "b", "-o", str(tmp_path / "x.safetensors")), 2, "-o names a directory"),
        (("generate", PROMPT, "-o", str(tmp_path / "v.avi")), 2, "must end in .mp4 or .gif"),
        (("refine", "--lora", str(tmp_path / "l.safetensors"), "--clip", "c", "--steps", "3"), 2,
         f"{tmp_path / 'l.safetensors'}: LoRA file not found"),
        (("predict", PROMPT, "--params", str(tmp_path / "p.yaml"), *_models(art)[:6]), 2,
         f"{tmp_path / 'p.yaml'}: params file not found"),
        (("refine", "--lora", str(art["params"]), "--clip", str(art["params"]), "--steps", "3", "--eval-steps", "1,5",
          *_models(art, False)), 2, "--eval-steps 5 is past --steps 3"),
        (("refine", "--lora", "x", "--clip", "c", "--steps", "3", "--eval-steps", "1,a"), 2,
         "'1,a' is not a comma-separated list"),
    ]
    for args, code, message in cases:
        r = _run(*args)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr[-500:])
        assert "Traceback" not in r.stderr


def _frames(path: Path) -> np.ndarray:
    return iio.imread(path, index=None)


def test_generate_writes_deterministic_videos_and_the_lora_matters(art, tmp_path, capsys):
    common = [PROMPT, "--steps", "3", "--seed", "1", *_models(art)]
    assert main(["generate", *common, "-o", str(tmp_path / "a.mp4"), "--compare"]) == 0
    assert main(["generate", *common, "-o", str(tmp_path / "b.gif")]) == 0
    assert main(["generate", *common, "-o", str(tmp_path / "base.mp4"), "--no-lora"]) == 0
    out = capsys.readouterr().out
    assert "predicted LoRA" in out and "no LoRA (base model)" in out
    p = PARAMS["preprocess"]
    for name in ("a.mp4", "a.gif", "b.mp4", "b.gif", "base.gif"):
        assert _frames(tmp_path / name).shape[:3] == (p["num_frames"], p["height"], p["width"]), name
    assert _frames(tmp_path / "a_compare.gif").shape[:3] == (p["num_frames"], p["height"], 2 * p["width"] + 2)
    assert np.array_equal(_frames(tmp_path / "a.gif"), _frames(tmp_path / "b.gif"))  # same seed, same video
    assert not np.array_equal(_frames(tmp_path / "a.gif"), _frames(tmp_path / "base.gif"))  # the LoRA matters
    # a LoRA file gives the same video as the prediction it holds
    assert main(["predict", PROMPT, "-o", str(tmp_path / "l.safetensors"), *_models(art)]) == 0
    assert main(["generate", *common, "--lora", str(tmp_path / "l.safetensors"), "-o", str(tmp_path / "c.gif")]) == 0
    assert np.array_equal(_frames(tmp_path / "a.gif"), _frames(tmp_path / "c.gif"))


def test_generate_refuses_a_lora_for_another_base(art, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    tensors = {k: v for k, v in load_tensors(_predict_file(art, tmp_path)).items() if "blocks.1." not in k}
    save_tensors(bad, tensors)
    with pytest.raises(SystemExit) as e:
        main(["generate", PROMPT, "--lora", str(bad), "-o", str(tmp_path / "v.mp4"), *_models(art, False)])
    assert e.value.code == 1
    assert f"lofa generate: error: {bad}: missing key 'diffusion_model.blocks.1.self_attn.q.lora_A.weight'" \
        in capsys.readouterr().err


def _predict_file(art, tmp_path: Path) -> Path:
    path = tmp_path / "pred.safetensors"
    assert main(["predict", PROMPT, "-o", str(path), *_models(art)]) == 0
    return path


def test_refine_reports_curves_and_steps_to_the_oracle(art, tmp_path, capsys):
    clip = write_clip(tmp_path / "clip.safetensors")
    pred = _predict_file(art, tmp_path)
    cfg = from_dict(fit.FitConfig, PARAMS["fit_loras"])
    fit.fit_shard(load_base(art["base"]).dit, [fit.ClipRecord(CLIP_ID, str(clip), CAPTION)], tmp_path / "fit", cfg,
                  progress=False)  # the clip's oracle, as the fit_loras stage makes it
    oracle = lora_path(tmp_path / "fit", CLIP_ID)
    report = tmp_path / "r.json"
    steps = str(cfg.steps)
    assert main(["refine", "--lora", str(pred), "--clip", str(clip), "--steps", steps, "-o", str(tmp_path / "ref.safetensors"),
                 "--oracle", str(oracle), "--report", str(report), *_models(art, False)]) == 0
    out = capsys.readouterr().out
    assert f"refine {CLIP_ID}: {steps} steps" in out and "steps to the oracle's loss" in out
    r = read_json(report)
    assert r["eval_steps"] == [0, 1, 2, 4, 8] and len(r["refined"]["losses"]) == 8
    assert r["fresh"]["eval_losses"][0] == pytest.approx(r["base_loss"])  # B = 0 at the start of a fresh fit
    assert r["fresh"]["eval_losses"][-1] == pytest.approx(r["oracle_loss"])  # the fresh fit is fit_loras' fit
    assert r["fresh_steps_to_oracle"] in (1, 2, 4, 8)
    assert r["refined"]["eval_losses"][-1] < r["refined"]["eval_losses"][0]  # refining lowers the clip's loss
    meta = read_metadata(tmp_path / "ref.safetensors")
    assert meta["prompt"] == PROMPT and meta["refine_clip"] == CLIP_ID and meta["refine_steps"] == steps


def test_predict_from_the_model_registry_matches_the_directories(art, tmp_path):
    from lofa.serving.registry import register_hypernet
    from lofa.tracking import stage_run

    with stage_run("train_stage2", {}) as ml:
        version = register_hypernet(ml, art["stage2"], art["stage1"], art["params"], art["base"], name="lofa-cli-test")
    uri = f"models:/lofa-cli-test/{version.version}"
    a, b = tmp_path / "dirs.safetensors", tmp_path / "registry.safetensors"
    assert main(["predict", PROMPT, "-o", str(a), *_models(art)]) == 0
    assert main(["predict", PROMPT, "-o", str(b), "--model", uri]) == 0
    ta, tb = load_tensors(a), load_tensors(b)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k].numpy(), tb[k].numpy()) for k in ta)
    assert read_metadata(b)["base_model_hash"] == read_metadata(a)["base_model_hash"]
    r = _run("predict", PROMPT, "-o", str(tmp_path / "x.safetensors"), "--model", "nope:/x")
    assert r.returncode == 2 and "nope:/x: not a models:/NAME/VERSION" in r.stderr and "Traceback" not in r.stderr
