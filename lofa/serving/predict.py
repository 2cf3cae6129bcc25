"""Prompt -> LoRA file: the product path of a trained LoFA hypernetwork, and video generation.

A :class:`Predictor` holds the frozen base DiT's adapted weights W, the stage-I and
stage-II hypernetworks and the profile's text encoder. The matrix tokens of every
W depend on W only, so they are embedded once (``HyperNet.embed``) and reused by
every later prompt; a prediction is then the text encoding plus the two trunks.
:meth:`Predictor.save` writes the standard LoRA file of DESIGN section 4 (export
keys, alpha folded into B, prompt / base-model hash / rank / producer in the
safetensors header), which DiffSynth, ComfyUI and diffusers load.

What it reads (what the pipeline stages write): the base model and the two stage directories
through :mod:`lofa.artifacts`, and the ``preprocess`` section of ``params.yaml`` (profile, text
length, clip size, local weight paths).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lofa.artifacts.base import BaseModel, load_base
from lofa.artifacts.hypernets import load_stage
from lofa.config import load_section
from lofa.data.preprocess import PreprocessConfig, codec_for, text_encoder_for
from lofa.encoders.text import TextEncoder, is_blank
from lofa.encoders.video import VideoCodec, latent_shape
from lofa.hypernet import EmbeddedGroup, HyperNet, HyperOutput, MatrixGroup, group_by_shape, trim_text
from lofa.layers import Vocabulary
from lofa.lora import LoRAWeights, base_weights, save_lora
from lofa.media import decode_latents, write_video
from lofa.objectives import predicted_lora
from lofa.sampling import sample
from lofa.serving.predict_graph import PredictionGraph

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class PredictError(ValueError):
    """A request the predictor cannot serve (empty prompt, mismatched artifacts), said plainly."""


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """The prompts as a list; empty or invisible-only prompts raise :class:`PredictError`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise PredictError("no prompt given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or is_blank(p):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i + 1} of {len(prompts)}"
            raise PredictError(f"{which} is empty: describe the video, e.g. 'a figure waves slowly'")
    return prompts


# --------------------------------------------------------------------------- params

def load_preprocess(params_path: str | Path) -> PreprocessConfig:
    """The ``preprocess`` section: how prompts were encoded and clips sized for training."""
    return load_section(PreprocessConfig, "preprocess", params_path)


# --------------------------------------------------------------------------- prediction

@dataclass(frozen=True)
class PredictedLoRA:
    """One prompt's LoRA: per vocabulary matrix A (rank, in) and B (out, rank), alpha folded into B.

    ``seconds``: wall time of the call that produced it (text encoding + both
    stages), shared by every prompt of a batch.
    """

    prompt: str
    vocab: Vocabulary
    A: tuple[Tensor, ...]
    B: tuple[Tensor, ...]
    seconds: float

    @property
    def rank(self) -> int:
        return int(self.A[0].shape[0])

    def to_weights(self, device: str | torch.device | None = None) -> LoRAWeights:
        """As a K = 1 :class:`LoRAWeights` (scale 1) for :func:`lofa.lora.apply_lora` / sampling."""
        return LoRAWeights.from_factors(self.vocab, [a.to(device) for a in self.A], [b.to(device) for b in self.B])


#: Lengths a one-prompt text is padded to (the keys past the prompt masked): one captured graph,
#: and with ``compile`` one compile, per bucket, not per prompt length.
TEXT_BUCKETS = (64, 128, 256, 512)


def text_bucket(length: int, max_length: int) -> int:
    """The padded length of a trimmed text of ``length`` tokens from an encoder of ``max_length``:
    the smallest of ``TEXT_BUCKETS`` that holds it, at most ``max_length`` (past the last
    bucket, the length itself)."""
    if not 0 < length <= max_length:
        raise ValueError(f"text_bucket: length {length} not in 1..{max_length}")
    return next((min(b, max_length) for b in TEXT_BUCKETS if length <= b), length)


def _tile(e: EmbeddedGroup, num_prompts: int, drop_weight: bool = False) -> EmbeddedGroup:
    """The embedded matrices of one prompt repeated for ``num_prompts`` prompts (prompt-major).

    The hypernetwork reads only the shape and ids of an embedded group's matrices (the
    tokens carry W), so the tiled group's weight is a meta-device placeholder: W is
    never copied per prompt (nor kept at all with ``drop_weight``). Its ids are on the host,
    where reading them (``predicted_lora``) needs no GPU sync.
    """
    if num_prompts == 1 and not drop_weight:
        return e
    n, (out_f, in_f) = e.tokens.shape[0], e.group.shape
    ids = e.group.matrix_ids.cpu()
    group = MatrixGroup(torch.empty((n * num_prompts, out_f, in_f), device="meta"), ids.repeat(num_prompts),
                        torch.arange(num_prompts, device=ids.device).repeat_interleave(n))
    return EmbeddedGroup(group, e.tokens.repeat(num_prompts, 1, 1), e.rms.repeat(num_prompts), e.model_id)


class Predictor:
    """Prompts -> LoRAs for one base model, with the matrix tokens cached across calls.

    Args:
        base: the frozen base model (its W are read once).
        stage2: the stage-II hypernetwork; stage1: the stage-I one (None only for the
            one-stage ablation, ``use_stage1: false``).
        encoder: the text encoder the hypernetworks were trained with.
        hypernet_hash: recorded in every file's header (stage II's weights hash).
        dtype: "float32", or "bfloat16": the hypernetworks are cast to it once (in place, as
            ``nn.Module.to`` does) and run in it, the path benchmarks/bench_hypernet.py times
            (sections ``graph_predict`` and ``predictor``). Under autocast instead, every call
            would cast every weight again and the MLPs' GELU would run as passes of their own.
        cuda_graph: on a GPU, a one-prompt prediction replays one captured CUDA graph per
            text length bucket (``lofa.serving.predict_graph``; the trimmed text is padded to
            ``text_bucket`` with the padding masked, so prompts of 20 and 50 tokens share a
            graph; captured on first use, up to ``MAX_GRAPHS`` kept); elsewhere the same
            schedule runs uncaptured.
        compile: compile the hypernetworks' regions (``HyperNet.compile_regions``): on an
            H100 at the Wan2.1-1.3B shapes in bf16, ``predict`` takes 57.8 ms compiled
            (benchmarks/bench_hypernet.py, section ``predictor``) and a graphed prediction 70 ms
            with nothing compiled (``graph_predict_eager``), for up to ~20 s of compiling on first
            use; worth it for a process serving many prompts.
    """

    MAX_GRAPHS = 8

    def __init__(self, base: BaseModel, stage2: HyperNet, stage1: HyperNet | None, encoder: TextEncoder, *,
                 hypernet_hash: str = "", dtype: str = "float32", cuda_graph: bool = True,
                 compile: bool = False) -> None:
        if dtype not in _DTYPES:
            raise PredictError(f"dtype {dtype!r} is not one of {list(_DTYPES)}")
        if stage2.cfg.uses_stage1 and stage1 is None:
            raise PredictError("this stage-II model attends to stage-I tokens: a stage-I model is needed")
        if encoder.dim != stage2.cfg.text_dim:
            raise PredictError(f"the text encoder gives {encoder.dim}-d tokens; the hypernetwork expects "
                               f"{stage2.cfg.text_dim}-d (preprocess profile mismatch?)")
        self.vocab = stage2.vocab
        _check_vocab(self.vocab, base.vocabulary(self.vocab.modules), "stage II", base)
        if stage1 is not None and stage2.cfg.uses_stage1:
            _check_vocab(stage1.vocab, self.vocab, "stage I", base)
        self.base, self.encoder, self.hypernet_hash, self.dtype = base, encoder, hypernet_hash, _DTYPES[dtype]
        self.device = next(base.dit.parameters()).device
        self.stage2 = stage2.to(self.device, self.dtype).eval().requires_grad_(False)
        self.stage1 = (stage1.to(self.device, self.dtype).eval().requires_grad_(False) if stage2.cfg.uses_stage1
                       else None)
        if compile:
            for m in (self.stage2, self.stage1):
                if m is not None:
                    m.compile_regions()
        self._embedded = {id(m): self._embed_all(m) for m in (self.stage2, self.stage1) if m is not None}
        self.cuda_graph = cuda_graph
        self._graphs: dict[int, PredictionGraph] = {}

    @torch.no_grad()
    def _embed_all(self, model: HyperNet) -> list[EmbeddedGroup]:
        """The model's matrix tokens of every W, once (W does not change); W itself is not kept."""
        W = [w.detach().float() for w in base_weights(self.base.dit, self.vocab)]
        mids = torch.arange(len(self.vocab))
        out = []
        for _, pos in group_by_shape(self.vocab, mids, torch.zeros_like(mids)):
            ids = mids[pos].to(self.device)
            e = model.embed(MatrixGroup(torch.stack([W[j] for j in pos.tolist()]), ids, torch.zeros_like(ids)))
            out.append(_tile(e, 1, drop_weight=True))
        return out

    def _graph(self, text_len: int, masked: bool) -> PredictionGraph:
        """The one-prompt PredictionGraph for texts of ``text_len`` tokens, with a key mask or all
        valid (made on first use)."""
        key = (text_len, masked)
        graph = self._graphs.pop(key, None)
        if graph is None:
            if len(self._graphs) >= self.MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            pool = next(iter(self._graphs.values())).pool if self._graphs else None
            graph = PredictionGraph(self.stage1, self.stage2, self._embedded.get(id(self.stage1)),
                                    self._embedded[id(self.stage2)], text_len, masked=masked,
                                    graph=self.cuda_graph, pool=pool)
        self._graphs[key] = graph  # most recently used last
        return graph

    @classmethod
    def from_dirs(cls, base_dir: str | Path, stage1_dir: str | Path | None, stage2_dir: str | Path,
                  params_path: str | Path = "params.yaml", *, device: str | torch.device = "cpu",
                  dtype: str = "float32", cuda_graph: bool = True, compile: bool = False) -> "Predictor":
        """Load the pipeline's artifacts: base model, stage I (may be None for the ablation), stage II."""
        pre = load_preprocess(params_path)
        stage2, hash2, weights_hash = load_stage(stage2_dir, 2)
        stage1 = None
        if stage2.cfg.uses_stage1:
            if stage1_dir is None:
                raise PredictError(f"{stage2_dir}: this stage-II model needs a stage-I directory")
            stage1, hash1, _ = load_stage(stage1_dir, 1)
            if hash1 != hash2:
                raise PredictError(f"{stage1_dir} was trained on base model {hash1}, {stage2_dir} on {hash2}")
        base = load_base(base_dir, device)
        if hash2 and hash2 != base.hash:
            raise PredictError(f"{stage2_dir} was trained on base model {hash2}; {base_dir} holds {base.hash}")
        return cls(base, stage2, stage1, text_encoder_for(pre, device), hypernet_hash=weights_hash, dtype=dtype,
                   cuda_graph=cuda_graph, compile=compile)

    def predict(self, prompt: str) -> PredictedLoRA:
        """The LoRA of one prompt."""
        return self.predict_batch([prompt])[0]

    @torch.no_grad()
    def predict_batch(self, prompts: Sequence[str]) -> list[PredictedLoRA]:
        """The LoRAs of several prompts in one pass (one text encoding, shared matrix tokens)."""
        prompts = check_prompts(prompts)
        t0 = time.perf_counter()
        emb = self.encoder.encode(prompts)
        if len(prompts) == 1:  # the serving path: W's tokens are cached, the text trimmed, one graph
            text, mask = trim_text(emb.tokens, emb.mask, self.stage2.cfg.text_dim)
            text, mask = text.to(self.device), None if mask is None else mask.to(self.device)
            length = text.shape[1]
            size = text_bucket(length, emb.tokens.shape[1])
            if size > length:  # padded to its bucket, the padding masked
                valid = torch.ones(1, length, dtype=torch.bool, device=self.device) if mask is None else mask
                text = torch.cat([text, text.new_zeros(1, size - length, text.shape[2])], dim=1)
                mask = torch.cat([valid, valid.new_zeros(1, size - length)], dim=1)
            groups = self._embedded[id(self.stage2)]
            outs = self._graph(size, mask is not None).replay(text, mask)  # the graph's own: _finish copies
            return self._finish(prompts, groups, outs, t0, copy=True)
        text, mask = emb.tokens.to(self.device), emb.mask.to(self.device)
        groups = [_tile(e, len(prompts)) for e in self._embedded[id(self.stage2)]]
        tokens = None
        if self.stage1 is not None:
            s1_groups = [_tile(e, len(prompts)) for e in self._embedded[id(self.stage1)]]
            tokens = [o.tokens for o in self.stage1(s1_groups, text, mask)]
        outs = self.stage2(groups, text, mask, tokens)
        return self._finish(prompts, groups, outs, t0)

    def _finish(self, prompts: list[str], groups: Sequence[EmbeddedGroup], outs: Sequence[HyperOutput],
                t0: float, copy: bool = False) -> list[PredictedLoRA]:
        """The predictions as fp32 factors; ``copy``: outs are a graph's own buffers (the next replay
        overwrites them), copied even where they are fp32 already."""
        # fp32 per group, then per-matrix views: one conversion per group, not one per matrix (480
        # small kernels and their launches at the Wan2.1-1.3B shapes)
        fp32 = lambda t: None if t is None else t.to(torch.float32, copy=copy)  # noqa: E731
        outs = [HyperOutput(fp32(o.A), fp32(o.B), fp32(o.alpha), o.tokens) for o in outs]
        lora = predicted_lora(self.vocab, [g.group for g in groups], outs, len(prompts))
        # each prompt's per-matrix views are made while the GPU still runs the prediction
        factors = [(tuple(a[k] for a in lora.A), tuple(b[k] for b in lora.B)) for k in range(len(prompts))]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        return [PredictedLoRA(p, self.vocab, A, B, seconds) for p, (A, B) in zip(prompts, factors)]

    def metadata(self, pred: PredictedLoRA) -> dict[str, str]:
        """The safetensors header of ``pred``'s file (``save_lora`` adds rank, producer, format)."""
        return {"prompt": pred.prompt, "base_model_hash": self.base.hash, "hypernet_hash": self.hypernet_hash,
                "predict_seconds": f"{pred.seconds:.6f}"}

    def save(self, pred: PredictedLoRA, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write ``pred`` as a standard LoRA file (DESIGN section 4), atomically, dated, with its
        model card beside it (``<stem>.md``)."""
        path = Path(path)
        how = (f"predicted from the prompt alone by the LoFA hypernetwork `{self.hypernet_hash}` in "
               f"{pred.seconds * 1000:.1f} ms (no fitting)")
        save_lora(path, [a.cpu() for a in pred.A], [b.cpu() for b in pred.B], pred.vocab, self.metadata(pred),
                  dtype=dtype, date=datetime.now(timezone.utc), card=how,
                  description=f"LoRA predicted by lofa's LoFA hypernetwork for the prompt: {pred.prompt}")
        return path


def _check_vocab(got: Vocabulary, want: Vocabulary, what: str, base: BaseModel) -> None:
    """Raise PredictError naming the first matrix where ``got`` and ``want`` differ."""
    for i in range(max(len(got), len(want))):
        a = got.matrices[i] if i < len(got) else None
        b = want.matrices[i] if i < len(want) else None
        if a != b:
            raise PredictError(f"{what} was trained for another base shape than {base.path}: matrix {i} is "
                               f"{a} in the hypernetwork, {b} in the base model")


# --------------------------------------------------------------------------- generation

@torch.no_grad()
def generate_video(base: BaseModel, codec: VideoCodec, context: Tensor, *, frames: int, height: int,
                   width: int, lora: LoRAWeights | None = None, seed: int = 0, steps: int = 20,
                   guidance: float = 3.0) -> tuple[Tensor, np.ndarray]:
    """Sample one video from the base DiT (plus ``lora``) and decode it.

    Args:
        context: (1, L, text_dim) prompt embedding (as the text encoder returns it).
        frames, height, width: video size (4k+1 frames, multiples of 16 pixels).
        seed: the initial noise comes from a CPU generator, so a seed gives the same
            noise on every device.
    Returns:
        latents (1, 16, T', H', W') and the decoded video (frames, height, width, 3) uint8.
    """
    if context.ndim != 3 or context.shape[0] != 1:
        raise ValueError(f"generate_video: context must be (1, L, D), got {tuple(context.shape)}")
    if frames < 1 or (frames - 1) % 4 or height < 16 or width < 16 or height % 16 or width % 16:
        raise PredictError(f"video size {frames}x{height}x{width}: frames must be 4k+1 and height, width "
                           f"positive multiples of 16")
    latents = sample(base.dit, context, latent_shape(frames, height, width), steps=steps,
                     guidance=guidance, generator=torch.Generator().manual_seed(seed), lora=lora)
    return latents, decode_latents(codec, latents)[0]


def write_videos(path: str | Path, frames: np.ndarray, fps: float, upscale: int = 1) -> list[Path]:
    """Write ``frames`` (T, H, W, 3) uint8 as ``path`` and its twin (.mp4 and .gif, same stem)."""
    path = Path(path)
    if path.suffix not in (".mp4", ".gif"):
        raise PredictError(f"{path}: the output must end in .mp4 or .gif (both are written)")
    twin = path.with_suffix(".gif" if path.suffix == ".mp4" else ".mp4")
    written = [write_video(path, frames, fps=fps, upscale=upscale)]
    try:
        written.append(write_video(twin, frames, fps=fps, upscale=upscale))
    except Exception as e:  # no H.264 encoder here (imageio-ffmpeg or PyAV missing): the GIF asked for stands
        if twin.suffix != ".mp4":
            raise
        warnings.warn(f"{twin}: not written, no mp4 encoder ({type(e).__name__}: {e}); pip install imageio-ffmpeg")
    return written
