"""The real profile (Wan2.1 + MotionX) end to end at Wan2.1's shapes: every stage's command from
dvc.yaml with ``params-real.yaml``, then ``lofa predict`` and ``lofa generate`` at 81x480x832.

Nothing here downloads: the model files are random weights at full size under Wan's key names
(the Wan2.1-T2V-1.3B DiT, the Wan VAE, umT5-XXL), saved as safetensors, with a tokenizer of
umT5's vocabulary size built locally; the clips are H.264 mp4s of moving shapes in the MotionX
layout. Each stage prints what it did; per stage this script records wall seconds and the GPU's
peak memory (nvidia-smi), and from the measured rates estimates what a full run costs
(GPU-hours for N clips at 17x256x256 and at 81x480x832). On a GPU machine without DVC:

    python scripts/real_profile.py clips --root .real/motionx        # here, once (needs imageio-ffmpeg)
    python scripts/real_profile.py run --root .real/motionx --work /tmp/real --out $OUT

``--phase setup`` builds the model files, ``--phase stages`` runs the stages (a killed run
resumes: model files that exist are kept, stages recorded in ``<work>/rows.json`` are skipped, and
the stage that was cut off resumes as under DVC); ``--tiny`` runs
the same path on a CPU with a tiny umT5 / DiT of the same architectures at 17x64x64
(tests/test_real_profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("preprocess", "pretrain_base", "fit_loras", "train_stage1", "train_stage2", "train_stage2_naive",
          "evaluate")
SKIPPABLE = ("train_stage2_naive", "evaluate")  # stages that predict and generate do not read
UMT5_VOCAB = 256384
CAPTIONS = ("a person walks forward and waves the right hand", "a person jumps twice in place",
            "a person turns around slowly with arms raised", "a person kicks with the left leg",
            "a person bows deeply and stands up", "a person runs in a small circle",
            "a person squats down and jumps up", "a person waves both hands above the head")
HELD_OUT = 2  # the last clips are the val split (evaluate's held-out prompts)
#: What the few-step run changes in params-real.yaml (the full run's values stay for the estimates).
FEW_STEPS = {"fit_loras.steps": 4, "train_stage1.train.max_steps": 10, "train_stage1.train.ckpt_every": 5,
             "train_stage2.train.max_steps": 4, "train_stage2.train.ckpt_every": 2,
             "train_stage2.prompts_per_batch": 1, "train_stage1.compile": False, "train_stage2.compile": False,
             "evaluate.eval_points": 2, "evaluate.sample_steps": 4, "evaluate.num_videos": 1,
             "evaluate.generalist_steps": 2, "evaluate.bootstrap": 200}
#: The CPU variant: a tiny umT5 and DiT of Wan's architectures, the full-size VAE, 17x64x64.
TINY_T5 = {"vocab": UMT5_VOCAB, "dim": 32, "dim_attn": 32, "dim_ffn": 64, "num_heads": 2, "num_layers": 2}
TINY = {"preprocess.num_frames": 17, "preprocess.height": 64, "preprocess.width": 64,
        "preprocess.text_max_length": 16, "preprocess.device": "cpu", "preprocess.text_encoder_dtype": "float32",
        "preprocess.text_encoder_dims": TINY_T5,
        "pretrain_base.dit": {"dim": 128, "ffn_dim": 256, "num_heads": 4, "num_layers": 2, "text_dim": 32},
        "fit_loras.rank": 4, "fit_loras.alpha": 4.0, "fit_loras.dtype": "float32", "fit_loras.clips_per_batch": 4,
        **{f"train_stage{s}.model.{k}": v for s in (1, 2) for k, v in
           {"d_model": 64, "num_heads": 2, "num_blocks": 2, "patch_size": 32, "rank": 4, "text_dim": 32}.items()},
        "train_stage2.model.cross_stage1_after": [0, 1]}


def _set(tree: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def run_params(work: Path, models: Path, tiny: bool, size: tuple[int, int, int] | None = None) -> Path:
    """params-real.yaml with the model paths under ``models``, FEW_STEPS (and TINY) applied."""
    params = yaml.safe_load((REPO / "params-real.yaml").read_text())
    for key, value in {**FEW_STEPS, **(TINY if tiny else {})}.items():
        _set(params, key, value)
    _set(params, "preprocess.text_encoder_path", str(models / "umt5-xxl-enc.safetensors"))
    _set(params, "preprocess.tokenizer_path", str(models / "umt5-tokenizer"))
    _set(params, "preprocess.vae_path", str(models / "Wan2.1_VAE.safetensors"))
    _set(params, "pretrain_base.weights", str(models / "Wan2.1-T2V-1.3B" / "diffusion_pytorch_model.safetensors"))
    if size is not None:
        for key, v in zip(("num_frames", "height", "width"), size):
            _set(params, f"preprocess.{key}", v)
    path = work / "params-run.yaml"
    work.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


# --------------------------------------------------------------------------- inputs

def make_clips(root: Path, n: int = 6, frames: int = 97, height: int = 480, width: int = 832, fps: int = 16) -> None:
    """``n`` H.264 mp4 clips of a moving disc and bar (MotionX layout, captions, train/val splits)."""
    import imageio.v2 as imageio

    yy, xx = np.mgrid[0:height, 0:width]
    ids = [f"real/clip_{i:03d}" for i in range(n)]
    for i, cid in enumerate(ids):
        rng = np.random.default_rng(i)
        colour, back = rng.integers(40, 255, 3), rng.integers(0, 90, 3)
        path = root / "video" / f"{cid}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=6, macro_block_size=16) as w:
            for t in range(frames):
                cx = width * (0.2 + 0.6 * t / frames)
                cy = height * (0.5 + 0.25 * np.sin(2 * np.pi * t / 24 + i))
                disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (0.12 * height) ** 2
                bar = np.abs(xx - width * (0.8 - 0.6 * t / frames)) < 0.03 * width
                img = np.broadcast_to(back, (height, width, 3)).copy()
                img[disc], img[bar] = colour, 255 - colour
                w.append_data(img.astype(np.uint8))
        cap = root / "texts" / "semantic_labels" / f"{cid}.txt"
        cap.parent.mkdir(parents=True, exist_ok=True)
        cap.write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "train.txt").write_text("\n".join(ids[:-HELD_OUT]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[-HELD_OUT:]) + "\n")


def build_tokenizer(out: Path, vocab_size: int = UMT5_VOCAB) -> None:
    """A word-level tokenizer of umT5's vocabulary size: pad 0, eos 1, unk 2, the captions' words,
    then filler tokens; every sequence ends in eos, as umT5's does."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.lower().split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *words])}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(out)


def build_models(models: Path, tiny: bool) -> dict[str, float]:
    """Random-weight model files at full size (``tiny``: small umT5 and DiT), skipping those present."""
    import torch
    from diffsynth.models.wan_video_text_encoder import WanTextEncoder
    from diffsynth.models.wan_video_vae import WanVideoVAE

    from lofa.encoders.text import T5Dims
    from lofa.io import save_tensors
    from lofa.wan import WAN21_T2V_1_3B, WanDiTConfig, build_dit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if tiny else torch.bfloat16
    params = yaml.safe_load((REPO / "params-real.yaml").read_text())
    seconds: dict[str, float] = {}
    torch.manual_seed(0)

    def timed(name: str, path: Path, build) -> None:
        if path.is_file():
            return
        t0 = time.perf_counter()
        save_tensors(path, {k: v.to(dtype) for k, v in build().state_dict().items()})
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[real_profile] {path}: {path.stat().st_size / 2**30:.2f} GiB in {seconds[name]} s", flush=True)

    dit_cfg = WanDiTConfig(**TINY["pretrain_base.dit"]) if tiny else WAN21_T2V_1_3B
    assert tiny or params["pretrain_base"]["dit"]["dim"] == WAN21_T2V_1_3B.dim
    timed("dit", models / "Wan2.1-T2V-1.3B" / "diffusion_pytorch_model.safetensors",
          lambda: build_dit(dit_cfg, device=device, dtype=dtype))
    timed("vae", models / "Wan2.1_VAE.safetensors", lambda: WanVideoVAE(z_dim=16).to(device).model)

    def t5():
        with torch.device(device):
            enc = WanTextEncoder(**{**vars(T5Dims()), **(TINY_T5 if tiny else {})}, dropout=0.0).to(dtype)
        with torch.no_grad():  # small random weights keep 24 random layers' activations finite in bf16
            for name, p in enc.named_parameters():
                p.normal_(0.0, 0.02) if p.ndim > 1 else p.fill_(1.0)
        return enc

    timed("umt5", models / "umt5-xxl-enc.safetensors", t5)
    if torch.cuda.is_available():  # the stages run in other processes: give them this one's cache
        torch.cuda.empty_cache()
    if not (models / "umt5-tokenizer" / "tokenizer.json").is_file():
        build_tokenizer(models / "umt5-tokenizer")
    return seconds


# --------------------------------------------------------------------------- stages

class GpuPeak:
    """The GPU's peak used memory (GiB) while the block runs, polled with nvidia-smi (None without)."""

    def __enter__(self) -> GpuPeak:
        self.peak, self._proc = None, None
        try:
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                           "-lms", "200"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            if line.strip().isdigit():
                self.peak = max(self.peak or 0.0, int(line) / 1024)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._thread.join(timeout=5)


def check_skip(skip: frozenset[str]) -> None:
    """ValueError unless every stage in ``skip`` is one of SKIPPABLE."""
    if skip - set(SKIPPABLE):
        raise ValueError(f"only {', '.join(SKIPPABLE)} can be left out, not {', '.join(sorted(skip - set(SKIPPABLE)))} "
                         "(predict and generate need it)")


def stage_commands(root: Path, params: Path, skip: frozenset[str] = frozenset()) -> list[tuple[str, list[str]]]:
    """(stage, argv) for STAGES but ``skip`` (of SKIPPABLE): the commands of dvc.yaml with the
    MotionX root and params file."""
    check_skip(skip)
    from pipelines.orchestration import load_stages

    stages = {s.name: s for s in load_stages(REPO / "dvc.yaml")}
    out = []
    for name in (n for n in STAGES if n not in skip):
        argv = shlex.split(stages[name].cmd.replace("data/motionx_synth", str(root)))
        if argv[0].endswith("python"):
            argv[0] = sys.executable
        out.append((name, [*argv, "--params", str(params)]))
    return out


def _run(name: str, argv: list[str], cwd: Path, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    print(f"[real_profile] {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with GpuPeak() as gpu, open(log, "a") as f:
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    row = {"stage": name, "wall_s": round(time.perf_counter() - t0, 1), "peak_gib": gpu.peak,
           "returncode": proc.returncode}
    print(f"[real_profile] {name}: {row}", flush=True)
    if proc.returncode:
        print(log.read_text()[-6000:])
        raise SystemExit(f"[real_profile] stage {name} failed (log {log})")
    return row


class Rows:
    """The rows measured so far, kept in ``<work>/rows.json`` after each stage: a call that ran out
    of time leaves them, and the next call on the same machine runs only the stages not yet done."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = json.loads(path.read_text()) if path.is_file() else []

    def run(self, name: str, argv: list[str], cwd: Path, log: Path, size: str) -> None:
        if any(r["stage"] == name and r["size"] == size for r in self.rows):
            print(f"[real_profile] {name} at {size}: done in an earlier call, skipped", flush=True)
            return
        self.rows.append({**_run(name, argv, cwd, log), "size": size})
        from lofa.io import write_json  # atomic

        write_json(self.path, self.rows)


def run_stages(root: Path, work: Path, params: Path, size: str, log: Path, rows: Rows,
               skip: frozenset[str] = frozenset()) -> None:
    """Every stage but ``skip``, then predict and generate at ``size`` (frames x height x width)."""
    for name, argv in stage_commands(root, params, skip):
        rows.run(name, argv, work, log, size)
    pre = yaml.safe_load(params.read_text())["preprocess"]
    device = "cuda" if pre["device"] == "cuda" else "cpu"
    cli = [sys.executable, "-m", "lofa.cli"]
    common = ["--params", str(params), "--device", device]
    rows.run("predict", [*cli, "predict", CAPTIONS[-1], "-o", "predicted.safetensors", *common,
                         "--dtype", "bfloat16" if device == "cuda" else "float32"], work, log, size)
    f, h, w = (int(x) for x in size.split("x"))
    rows.run("generate", [*cli, "generate", CAPTIONS[-1], "-o", "generated.gif", "--steps", "4",
                          "--frames", str(f), "--height", str(h), "--width", str(w), *common], work, log, size)


# --------------------------------------------------------------------------- estimates

def _timings(work: Path, stage: str) -> dict:
    path = work / "metrics" / "timings" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def estimates(work: Path, rows: list[dict], n_clips: tuple[int, ...] = (1000, 10000)) -> dict:
    """GPU-hours of a full run from this run's measured rates (the stages' own timings, which leave
    out model loading): preprocess seconds per clip, fit clip-steps/s times params-real.yaml's fit
    steps, per clip; stage I/II seconds per step times their steps (independent of the clip count)."""
    full = yaml.safe_load((REPO / "params-real.yaml").read_text())
    out: dict = {"fit_steps": full["fit_loras"]["steps"], "by_size": {}}
    for size in dict.fromkeys(r["size"] for r in rows):
        sub = work if size == rows[0]["size"] else work / f"size_{size}"
        pre, fit = _timings(sub, "preprocess"), _timings(sub, "fit_loras")
        if not pre.get("encoded_now") or not fit.get("clip_steps_per_s"):
            out["by_size"][size] = "not measured: this run encoded or fitted nothing new (rerun in a fresh --work)"
            continue
        pre_s = pre["seconds"] / pre["encoded_now"]
        per_clip = pre_s + full["fit_loras"]["steps"] / fit["clip_steps_per_s"]
        out["by_size"][size] = {"preprocess_s_per_clip": round(pre_s, 2),
                                "fit_clip_steps_per_s": round(fit["clip_steps_per_s"], 3),
                                **{f"gpu_hours_{n}_clips": round(n * per_clip / 3600, 1) for n in n_clips}}
    out["train_gpu_hours"] = {}
    for s in (1, 2):
        seconds = _timings(work, f"train_stage{s}").get("seconds")
        steps = full[f"train_stage{s}"]["train"]["max_steps"]
        if seconds:
            out["train_gpu_hours"][f"stage{s}"] = round(
                seconds / FEW_STEPS[f"train_stage{s}.train.max_steps"] * steps / 3600, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clips", help="write the mp4 clips (MotionX layout)")
    c.add_argument("--root", type=Path, required=True)
    c.add_argument("--num", type=int, default=6)
    c.add_argument("--size", default="97x480x832", help="frames x height x width of the source clips")
    r = sub.add_parser("run", help="model files, stages, predict, generate, estimates")
    r.add_argument("--root", type=Path, required=True, help="MotionX root (from `clips`)")
    r.add_argument("--work", type=Path, required=True, help="working directory (data/, metrics/, models/)")
    r.add_argument("--models", type=Path, help="model files (default: <work>/models)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where the JSON report goes")
    r.add_argument("--phase", choices=("setup", "stages", "all"), default="all")
    r.add_argument("--tiny", action="store_true", help="CPU: tiny umT5 and DiT, 17x64x64")
    r.add_argument("--small", default="17x256x256", help="also preprocess + fit at this size ('' to skip)")
    r.add_argument("--skip", default="", help=f"comma-separated stages not to run (of {', '.join(SKIPPABLE)})")
    args = p.parse_args(argv)
    skip = frozenset(filter(None, getattr(args, "skip", "").split(",")))
    try:
        check_skip(skip)
    except ValueError as e:
        p.error(f"--skip: {e}")
    if args.cmd == "clips":
        f, h, w = (int(x) for x in args.size.split("x"))
        make_clips(args.root, args.num, f, h, w)
        return
    work, models = args.work.resolve(), (args.models or args.work / "models").resolve()
    report: dict = {"tiny": args.tiny}
    if args.phase in ("setup", "all"):
        report["build_s"] = build_models(models, args.tiny)
    if args.phase in ("stages", "all"):
        import torch

        report["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        params = run_params(work, models, args.tiny)
        pre = yaml.safe_load(params.read_text())["preprocess"]
        size = f"{pre['num_frames']}x{pre['height']}x{pre['width']}"
        rows = Rows(work / "rows.json")
        run_stages(args.root.resolve(), work, params, size, work / "stages.log", rows, skip)
        if args.small and not args.tiny:
            small = work / f"size_{args.small}"
            sp = run_params(small, models, args.tiny, tuple(int(x) for x in args.small.split("x")))
            for name, argv in stage_commands(args.root.resolve(), sp)[:3]:  # preprocess, base, fit
                rows.run(name, argv, small, work / "stages.log", args.small)
        report["rows"] = rows.rows
        report["estimates"] = estimates(work, rows.rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "real_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    for row in report.get("rows", []):
        print(f"{row['stage']:<20} {row['size']:<12} {row['wall_s']:>8.1f} s  "
              f"{row['peak_gib'] if row['peak_gib'] is not None else '-':>6} GiB")


if __name__ == "__main__":
    main()
