"""The ``lofa`` command: predict (prompt -> LoRA file), generate (prompt -> video), refine, score.

Defaults point at the default pipeline's outputs (run from the repository root):
``data/base``, ``data/stage1``, ``data/stage2`` and ``params.yaml``. Cheap checks
(empty prompt, missing paths) run before any model is imported, so mistakes fail
in a fraction of a second with the offending path or value named.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lofa.env import setup_env


DEFAULT_BASE = Path("data/base")


class UsageError(Exception):
    """A mistake in the command line or its paths, reported without a traceback."""


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UsageError(f"{path}: {what} not found")
    return path


def _step_list(text: str) -> list[int]:
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of step counts") from None
    if not steps or min(steps) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give step counts >= 0")
    return steps


def _prompt(text: str) -> str:
    if not text.strip():
        raise UsageError("the prompt is empty: describe the video, e.g. 'a figure waves slowly'")
    return text


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """diffsynth prints model details while loading; keep stdout for the command's own results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _add_models(p: argparse.ArgumentParser, hypernets: bool = True) -> None:
    p.add_argument("--base", type=Path, default=None, help="base DiT directory (default: data/base)")
    if hypernets:
        p.add_argument("--stage1", type=Path, default=Path("data/stage1"),
                       help="stage-I directory (default: data/stage1)")
        p.add_argument("--stage2", type=Path, default=Path("data/stage2"),
                       help="stage-II directory (default: data/stage2)")
        p.add_argument("--model", default=None, metavar="URI",
                       help="a registered hypernetwork instead of --stage1/--stage2/--params, e.g. "
                            "models:/lofa-hypernet/1 (its base model is --base if given, else the registered one)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: params.yaml)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def _predictor(args: argparse.Namespace):
    dtype = getattr(args, "dtype", "float32")
    if getattr(args, "model", None):
        if not args.model.startswith(("models:/", "runs:/")) and not Path(args.model).exists():
            raise UsageError(f"{args.model}: not a models:/NAME/VERSION or runs:/ URI, nor a model directory")
        from lofa.serving.registry import load_predictor

        with _quiet_stdout():  # no --base: the base model where it was registered
            return load_predictor(args.model, base_dir=args.base, device=args.device, dtype=dtype)
    args.base = args.base or DEFAULT_BASE
    for name in ("base", "stage1", "stage2", "params"):
        _existing(getattr(args, name), {"params": "params file"}.get(name, f"{name} directory"))
    from lofa.serving.predict import Predictor

    with _quiet_stdout():
        return Predictor.from_dirs(args.base, args.stage1, args.stage2, args.params, device=args.device,
                                   dtype=dtype)


# --------------------------------------------------------------------------- predict

def cmd_predict(args: argparse.Namespace) -> int:
    prompts = [_prompt(p) for p in args.prompts]
    out = args.output
    if len(prompts) > 1 and out.suffix == ".safetensors":
        raise UsageError(f"{out}: with {len(prompts)} prompts, -o names a directory (one file per prompt)")
    t0 = time.perf_counter()
    predictor = _predictor(args)
    load_s = time.perf_counter() - t0
    import torch

    preds = predictor.predict_batch(prompts)
    paths = [out] if len(prompts) == 1 else [out / f"lora_{i:03d}.safetensors" for i in range(len(prompts))]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.save_dtype]
    for pred, path in zip(preds, paths):
        predictor.save(pred, path, dtype=dtype)
        print(f"{path}: rank {pred.rank}, {len(pred.A)} matrices, prompt {pred.prompt!r}")
    print(f"predicted {len(preds)} LoRA(s) in {preds[0].seconds * 1000:.1f} ms (models loaded in {load_s:.1f} s)")
    return 0


# --------------------------------------------------------------------------- generate

def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    if args.output.suffix not in (".mp4", ".gif"):
        raise UsageError(f"{args.output}: the output must end in .mp4 or .gif (both are written)")
    if args.lora is not None:
        _existing(args.lora, "LoRA file")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    _existing(args.params, "params file")
    from lofa.artifacts.base import load_base
    from lofa.artifacts.loras import load_user_lora
    from lofa.data.preprocess import codec_for, text_encoder_for
    from lofa.media import side_by_side
    from lofa.serving.predict import generate_video, load_preprocess, write_videos

    pre = load_preprocess(args.params)
    frames, height, width = args.frames or pre.num_frames, args.height or pre.height, args.width or pre.width
    with _quiet_stdout():
        if args.lora is None and not args.no_lora:
            predictor = _predictor(args)
            base, encoder = predictor.base, predictor.encoder
        else:
            base = load_base(_existing(args.base or DEFAULT_BASE, "base directory"), args.device)
            encoder = text_encoder_for(pre, args.device)
        codec = codec_for(pre, args.device)
    lora, source = None, "no LoRA (base model)"
    if args.lora is not None:
        lora, source = load_user_lora(args.lora, base).to_weights(args.device), f"LoRA {args.lora}"
    elif not args.no_lora:
        pred = predictor.predict(prompt)
        lora, source = pred.to_weights(args.device), f"predicted LoRA ({pred.seconds * 1000:.1f} ms)"
    context = encoder.encode([prompt]).tokens
    kw = dict(frames=frames, height=height, width=width, seed=args.seed, steps=args.steps, guidance=args.guidance)
    t0 = time.perf_counter()
    _, video = generate_video(base, codec, context, lora=lora, **kw)
    print(f"sampled {frames}x{height}x{width}, {args.steps} steps, guidance {args.guidance}, seed {args.seed}, "
          f"{source}, in {time.perf_counter() - t0:.1f} s")
    for path in write_videos(args.output, video, args.fps or pre.fps, args.upscale):
        print(f"wrote {path}")
    if args.compare and lora is not None:
        _, plain = generate_video(base, codec, context, lora=None, **kw)
        stem = args.output.with_name(f"{args.output.stem}_compare{args.output.suffix}")
        for path in write_videos(stem, side_by_side([plain, video]), args.fps or pre.fps, args.upscale):
            print(f"wrote {path} (left: base model, right: with the LoRA)")
    return 0


# --------------------------------------------------------------------------- refine

def cmd_refine(args: argparse.Namespace) -> int:
    args.base = args.base or DEFAULT_BASE
    for path, what in ((args.lora, "LoRA file"), (args.clip, "clip file"), (args.base, "base directory"),
                       (args.params, "params file")):
        _existing(path, what)
    if args.oracle is not None:
        _existing(args.oracle, "oracle LoRA file")
    if args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.eval_steps and max(args.eval_steps) > args.steps:
        raise UsageError(f"--eval-steps {max(args.eval_steps)} is past --steps {args.steps}")
    from lofa.refine import refine_files

    with _quiet_stdout():
        report = refine_files(args.lora, args.clip, steps=args.steps, base_dir=args.base, params_path=args.params,
                              oracle_path=args.oracle, output=args.output, lr=args.lr, device=args.device,
                              report_path=args.report, eval_steps=args.eval_steps)
    print(report.summary())
    for path in (args.output, args.report):
        if path is not None:
            print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- score

def cmd_score(args: argparse.Namespace) -> int:
    args.base = args.base or DEFAULT_BASE
    for path, what in ((args.base, "base directory"), (args.params, "params file"),
                       *((p, "LoRA file") for p in args.loras), *((p, "clip file") for p in args.clips or ())):
        _existing(path, what)
    if args.clips and (args.data or args.ids):
        raise UsageError("give either --clips FILE... or --data DIR [--ids ID...], not both")
    if not args.clips and not args.data:
        raise UsageError("no clips: give --clips FILE... or --data DIR [--ids ID...]")
    if args.generate:
        _existing(args.judge, "judge directory (stage train_judge)")
    if args.meta is not None:
        _existing(args.meta, "meta.csv")
    import json

    from lofa.config import from_dict, load_params
    from lofa.evaluate import EvalConfig
    from lofa.score import clip_paths, score_files

    cfg = from_dict(EvalConfig, load_params(args.params).get("evaluate"), f"{args.params}:evaluate").scoring
    files = args.clips or clip_paths(_existing(args.data, "preprocessed directory"), args.ids or [])
    labels = None
    if args.meta is not None:
        import csv

        with open(args.meta, newline="") as f:
            labels = {r["id"]: r for r in csv.DictReader(f)}
    with _quiet_stdout():
        result = score_files(args.base, args.loras, files, cfg, judge_dir=args.judge if args.generate else None,
                             labels=labels, device=args.device)
    text = json.dumps(result, indent=2)
    if args.output is None:
        print(text)
    else:
        from lofa.io import write_text

        write_text(args.output, text + "\n")
        means = ", ".join(f"{k} {v['fm_loss']:.4f}" for k, v in result["loras"].items())
        print(f"scored {len(result['clips'])} clip(s): flow loss {means}; wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lofa", description="Predict a Wan2.1 LoRA from a prompt (LoFA), "
                                     "generate a video with it, refine it on a clip.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{predict,generate,refine,score}")

    p = sub.add_parser("predict", help="prompt(s) -> LoRA file(s)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="one or more prompts (batched)")
    p.add_argument("-o", "--output", type=Path, default=Path("lora.safetensors"),
                   help="LoRA file (one prompt) or directory (several; lora_000.safetensors, ...)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="hypernetwork weights and compute dtype (bfloat16: the GPU fast path)")
    _add_models(p)
    p.set_defaults(func=cmd_predict)

    g = sub.add_parser("generate", help="prompt -> video (mp4 + GIF) with the predicted or a given LoRA")
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("-o", "--output", type=Path, default=Path("out.mp4"), help="video path (.mp4 or .gif; both written)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--lora", type=Path, help="apply this LoRA file instead of predicting one")
    which.add_argument("--no-lora", action="store_true", help="the base model alone")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance (default: 3.0)")
    g.add_argument("--frames", type=int, help="frames, 4k+1 (default: preprocess.num_frames)")
    g.add_argument("--height", type=int, help="default: preprocess.height")
    g.add_argument("--width", type=int, help="default: preprocess.width")
    g.add_argument("--fps", type=float, help="default: preprocess.fps")
    g.add_argument("--upscale", type=int, default=1, help="nearest-neighbour upscale of the written video")
    g.add_argument("--compare", action="store_true", help="also write <out>_compare: base model | with the LoRA")
    _add_models(g)
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("refine", help="fit a few steps on one clip, starting from a LoRA")
    r.add_argument("--lora", type=Path, required=True, help="the LoRA to start from (e.g. a predicted one)")
    r.add_argument("--clip", type=Path, required=True, help="a preprocessed clip (data/preprocessed/clips/<id>.safetensors)")
    r.add_argument("--steps", type=int, required=True, help="fitting steps")
    r.add_argument("-o", "--output", type=Path, help="write the refined LoRA here")
    r.add_argument("--oracle", type=Path, help="the clip's fitted LoRA: report steps to reach its loss")
    r.add_argument("--lr", type=float, help="learning rate (default: fit_loras.lr)")
    r.add_argument("--report", type=Path, help="write the curves and numbers as JSON here")
    r.add_argument("--eval-steps", type=_step_list, metavar="N,N,...",
                   help="step counts at which to measure the eval loss (default: 0, 1, 2, 4, ..., steps; "
                        "each costs a run of that many steps)")
    _add_models(r, hypernets=False)
    r.set_defaults(func=cmd_refine)

    s = sub.add_parser("score", help="flow-matching loss (and judged samples) of LoRA files on preprocessed clips",
                       description="Score the base model and each LORA on clips as the evaluate stage does: the "
                                   "flow-matching loss at its fixed timesteps and noise (params evaluate section); "
                                   "with --generate, the judge's attributes of a sample from each clip's caption. "
                                   "JSON on stdout or in -o.")
    s.add_argument("loras", nargs="*", type=Path, metavar="LORA", help="LoRA files (the base model is always scored)")
    s.add_argument("--clips", nargs="+", type=Path, metavar="FILE",
                   help="preprocessed clip files (data/preprocessed/clips/<id>.safetensors)")
    s.add_argument("--data", type=Path, help="a preprocess output directory (with --ids, or every clip)")
    s.add_argument("--ids", nargs="+", metavar="ID", help="clip ids in --data")
    s.add_argument("--generate", action="store_true", help="also sample a video per LoRA and clip caption, judged")
    s.add_argument("--judge", type=Path, default=Path("data/judge"), help="judge directory (default: data/judge)")
    s.add_argument("--meta", type=Path, help="meta.csv of the synthetic world: judge accuracy against its labels")
    s.add_argument("-o", "--output", type=Path, help="write the JSON here (default: stdout)")
    _add_models(s, hypernets=False)
    s.set_defaults(func=cmd_score)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lofa`` (and ``python -m lofa.cli``); returns the exit status."""
    setup_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        parser.exit(2, f"lofa {args.command}: error: {e}\n")
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        parser.exit(1, f"lofa {args.command}: error: {e}\n")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe a bad input (file, config, prompt), printed without a traceback."""
    from lofa.config import ConfigError
    from lofa.io import ArtifactError
    from lofa.serving.predict import PredictError

    return ArtifactError, ConfigError, PredictError, FileNotFoundError


if __name__ == "__main__":
    sys.exit(main())
