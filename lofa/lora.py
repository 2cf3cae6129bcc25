"""Batched multi-LoRA on the Wan DiT, the LoRA file format, and response maps.

One functional path applies LoRAs: the adapted ``nn.Linear`` modules of the
vocabulary are replaced once by :class:`LoRALinear` (same parameters, same
state-dict keys), and ``with apply_lora(dit, lora): ...`` binds a
:class:`LoRAWeights` set for the duration of a forward. A set holds K LoRAs;
sample k of a batch of K goes through LoRA k (``K == 1`` broadcasts one LoRA
to the whole batch):

    y = x W^T + b + scale_k * (x A_k^T) B_k^T

Gradients flow to the LoRA tensors only when they require grad; the DiT's own
parameters are untouched. diffsynth's hot loading (``enable_lora_hot_loading``)
applies one LoRA to a whole batch, so it cannot fit K clips at once; this
module replaces it for fitting and stays compatible with its file format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lofa
from lofa import lora_formats as formats
from lofa.io import ArtifactError, load_tensors, read_metadata, save_tensors
from lofa.layers import AdaptedMatrix, Vocabulary

LORA_FORMAT = "lofa-lora-v1"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REQUIRED_METADATA = ("prompt", "base_model_hash")


class LoRAFormatError(ArtifactError):
    """A LoRA file that does not match the vocabulary (names the file and the first problem)."""


@dataclass(frozen=True)
class LoRAWeights:
    """K LoRAs over every matrix of ``vocab`` (vocabulary order).

    ``A[i]`` is (K, rank, in_i), ``B[i]`` is (K, out_i, rank); ``scale`` is a
    float or a (K,) tensor multiplying ``B A``.
    """

    vocab: Vocabulary
    A: tuple[torch.Tensor, ...]
    B: tuple[torch.Tensor, ...]
    scale: float | torch.Tensor = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "A", tuple(self.A))
        object.__setattr__(self, "B", tuple(self.B))
        if not len(self.A) == len(self.B) == len(self.vocab):
            raise ValueError(f"LoRAWeights: {len(self.A)} A and {len(self.B)} B tensors for "
                             f"{len(self.vocab)} vocabulary matrices")
        k, r = self.A[0].shape[0], self.A[0].shape[1]
        for m, a, b in zip(self.vocab, self.A, self.B):
            if tuple(a.shape) != (k, r, m.in_features) or tuple(b.shape) != (k, m.out_features, r):
                raise ValueError(f"LoRAWeights: {m.prefix} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
                                 f"expected ({k}, {r}, {m.in_features}) and ({k}, {m.out_features}, {r})")
        if isinstance(self.scale, torch.Tensor) and tuple(self.scale.shape) != (k,):
            raise ValueError(f"LoRAWeights: scale must be a float or a ({k},) tensor, got {tuple(self.scale.shape)}")

    @property
    def num_loras(self) -> int:
        return self.A[0].shape[0]

    @property
    def rank(self) -> int:
        return self.A[0].shape[1]

    def parameters(self) -> list[torch.Tensor]:
        return [*self.A, *self.B]

    def scale_of(self, k: int) -> float:
        return float(self.scale[k]) if isinstance(self.scale, torch.Tensor) else float(self.scale)

    def to(self, device: torch.device | str) -> "LoRAWeights":
        """The same LoRAs with every tensor on ``device``."""
        scale = self.scale.to(device) if isinstance(self.scale, torch.Tensor) else self.scale
        return LoRAWeights(self.vocab, tuple(a.to(device) for a in self.A), tuple(b.to(device) for b in self.B), scale)

    def factors(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """LoRA ``k`` as per-matrix A (rank, in) and B (out, rank), its scale folded into B."""
        s = self.scale_of(k)
        return [a[k].detach() for a in self.A], [b[k].detach() * s for b in self.B]

    @classmethod
    def from_factors(cls, vocab: Vocabulary, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor],
                     scale: float = 1.0) -> "LoRAWeights":
        """One LoRA (K = 1) from per-matrix A (rank, in) and B (out, rank)."""
        return cls(vocab, tuple(a.unsqueeze(0) for a in A), tuple(b.unsqueeze(0) for b in B), scale)


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (sharing the wrapped module's parameters) plus an optional bound LoRA set."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.adapter: tuple[torch.Tensor, torch.Tensor, float | torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.adapter is None:
            return y
        return y + lora_delta(x, *self.adapter)


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale_k (x_k A_k^T) B_k^T`` for each sample k.

    Args:
        x: (N, ..., in) inputs; N == K, or any N when K == 1.
        A: (K, r, in); B: (K, out, r); scale: float or (K,).
    Returns:
        (N, ..., out) in the dtype of ``x`` (LoRA tensors are cast, differentiably).
    """
    k = A.shape[0]
    if not torch.is_autocast_enabled(x.device.type):
        A, B = A.to(x.dtype), B.to(x.dtype)
    if k == 1:
        h = x @ A[0].T  # (N, ..., r)
        s = scale[0] if isinstance(scale, torch.Tensor) else scale
    elif k == x.shape[0]:
        h = torch.bmm(x.reshape(k, -1, x.shape[-1]), A.transpose(1, 2))  # (K, S, r)
        s = scale.view(k, 1, 1) if isinstance(scale, torch.Tensor) else scale
    else:
        raise ValueError(f"lora_delta: {k} LoRAs for a batch of {x.shape[0]} (need K == batch or K == 1)")
    if not (isinstance(s, float) and s == 1.0):
        h = h * (s.to(h.dtype) if isinstance(s, torch.Tensor) else s)
    if k == 1:
        return h @ B[0].T
    return torch.bmm(h, B.transpose(1, 2)).reshape(*x.shape[:-1], B.shape[1])


def wrap_linears(model: nn.Module, vocab: Vocabulary,
                 blocks: Iterable[int] | None = None) -> list[LoRALinear]:
    """Replace the vocabulary's linears by :class:`LoRALinear` (idempotent); return them in order."""
    wanted = None if blocks is None else set(blocks)
    out: list[LoRALinear] = []
    for m in vocab:
        if wanted is not None and m.block not in wanted:
            continue
        mod = model.get_submodule(m.prefix)
        if not isinstance(mod, LoRALinear):
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{m.prefix} is a {type(mod).__name__}, not an nn.Linear")
            if (mod.out_features, mod.in_features) != (m.out_features, m.in_features):
                raise ValueError(f"{m.prefix}: weight ({mod.out_features}, {mod.in_features}) does not match "
                                 f"the vocabulary's ({m.out_features}, {m.in_features})")
            parent_name, _, child = m.prefix.rpartition(".")
            mod = LoRALinear(mod)
            setattr(model.get_submodule(parent_name), child, mod)
        out.append(mod)
    return out


@contextmanager
def apply_lora(model: nn.Module, lora: LoRAWeights, blocks: Iterable[int] | None = None) -> Iterator[None]:
    """Bind ``lora`` to the model's adapted linears (only ``blocks`` if given) inside the block.

    Re-entrant: the previous bindings are restored on exit. With gradient
    checkpointing, use :func:`lofa.wan.dit_forward` (it re-binds on recompute).
    """
    blocks = None if blocks is None else tuple(blocks)
    idx = [i for i, m in enumerate(lora.vocab) if blocks is None or m.block in blocks]
    mods = wrap_linears(model, lora.vocab, blocks)
    previous = [mod.adapter for mod in mods]
    for mod, i in zip(mods, idx):
        mod.adapter = (lora.A[i], lora.B[i], lora.scale)
    try:
        yield
    finally:
        for mod, prev in zip(mods, previous):
            mod.adapter = prev


def base_weights(model: nn.Module, vocab: Vocabulary) -> list[torch.Tensor]:
    """The base weight W (out, in) of every vocabulary matrix (no copy)."""
    return [model.get_submodule(m.prefix).weight for m in vocab]


# --------------------------------------------------------------------------- files

@dataclass(frozen=True)
class LoRAFile:
    """A loaded LoRA: per-matrix A (rank, in) and B (out, rank), scale folded into B.

    ``key_format``: the style the file's keys were in (:data:`lofa.lora_formats.STYLE_NAMES`).
    """

    vocab: Vocabulary
    A: tuple[torch.Tensor, ...]
    B: tuple[torch.Tensor, ...]
    metadata: dict[str, str]
    key_format: str

    @property
    def rank(self) -> int:
        return self.A[0].shape[0]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, rank, in) and (M, out, rank); all matrices must share one shape."""
        try:
            return torch.stack(self.A), torch.stack(self.B)
        except RuntimeError:
            raise ValueError("LoRAFile.stacked: matrices of different shapes cannot be stacked") from None

    def to_weights(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoRAWeights:
        """As a K = 1 :class:`LoRAWeights` (scale 1)."""
        return LoRAWeights.from_factors(self.vocab, [a.to(device, dtype) for a in self.A],
                                        [b.to(device, dtype) for b in self.B])


def save_lora(path: str | Path, A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], vocab: Vocabulary,
              metadata: Mapping[str, object], scale: float = 1.0, dtype: torch.dtype = torch.float32, *,
              title: str | None = None, description: str | None = None, date: datetime | None = None,
              card: str | None = None) -> None:
    """Write one LoRA in the export format (DESIGN section 4), atomically.

    Args:
        A: per vocabulary matrix, (rank, in); B: per matrix, (out, rank).
        metadata: must hold ``prompt`` and ``base_model_hash``; ``rank``, ``producer``,
            ``format`` and the ``modelspec.*`` / ``ss_network_*`` entries LoRA managers show
            are added. ``scale`` is folded into B.
        title, description: ``modelspec.title`` / ``.description`` (default: from the prompt).
        date: ``modelspec.date``; only for files that are not pipeline outputs (those must be
            the same bytes on a rerun).
        card: how the LoRA was made; given, a model card is written beside the file
            (:func:`lofa.lora_formats.card_path`).
    """
    missing = [k for k in _REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"save_lora {path}: metadata lacks {missing}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"save_lora {path}: dtype {dtype} is not one of {list(_FLOAT_DTYPES)}")
    weights = LoRAWeights.from_factors(vocab, list(A), list(B))  # validates shapes
    tensors: dict[str, torch.Tensor] = {}
    for m, a, b in zip(vocab, A, B):
        ka, kb = m.lora_keys("export")
        tensors[ka] = a.detach().to(dtype)
        tensors[kb] = (b.detach().float() * scale).to(dtype)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"save_lora {path}: tensor {name!r} contains NaN or inf")
    meta = {k: str(v) for k, v in metadata.items()}
    prompt = meta["prompt"]
    description = description or f"A Wan2.1 LoRA made by lofa for the prompt: {formats.short(prompt, 300)}"
    meta.update(formats.modelspec(weights.rank, title or formats.short(prompt), description, date))
    meta.update(rank=str(weights.rank), producer=f"lofa {lofa.__version__}", format=LORA_FORMAT)
    save_tensors(path, tensors, meta)
    if card is not None:
        formats.write_lora_card(path, meta, vocab, card)


def load_lora(path: str | Path, vocab: Vocabulary, rank: int | None = None) -> LoRAFile:
    """Load a LoRA file in any style of :mod:`lofa.lora_formats`, validated against ``vocab``.

    kohya/musubi-tuner, ComfyUI and diffusers files are converted on load: ``.alpha`` (or
    diffusers' header ``lora_alpha``) folded into B as ``alpha / rank``. In those styles,
    matrices of a smaller rank than the file's largest are padded with zeros (exact: B A is
    unchanged; kohya's dynamic resize writes such files); lofa's own styles have one rank, the
    first matrix's or ``rank`` (given, every matrix must have it). Keys of modules outside
    ``vocab`` are refused, not skipped: a LoRA applied in part is another LoRA, and every
    number lofa reports about it would be about that other one.

    Fails with :class:`LoRAFormatError` naming the file and the first problem: missing key
    (an up without its down included), unexpected key, wrong shape, wrong dtype,
    non-finite values, a non-scalar alpha.
    """
    path = Path(path)
    tensors = load_tensors(path, check_finite=False)
    meta = read_metadata(path)
    try:
        st = formats.detect_style(path, tensors, vocab)
        _check_keys(path, tensors, vocab, st)
        default_scale = formats.adapter_scale(path, meta) if st.name == "diffusers" else None
        rank = rank if rank is not None or st.name in formats.PER_MATRIX_RANK else _first_rank(tensors, vocab, st)
        A, B = zip(*(_factors(path, tensors, m, st, rank, default_scale) for m in vocab))
    except ArtifactError as e:
        raise LoRAFormatError(str(e)) from None
    top = max(a.shape[0] for a in A)
    A = tuple(F.pad(a, (0, 0, 0, top - a.shape[0])) for a in A)  # (top, in): zero rows
    B = tuple(F.pad(b, (0, top - b.shape[1])) for b in B)  # (out, top): zero columns
    return LoRAFile(vocab, A, B, meta, st.name)


def _first_rank(tensors: Mapping[str, torch.Tensor], vocab: Vocabulary, st: formats.KeyStyle) -> int | None:
    """The rank of the first matrix's A: the one rank of a file in lofa's own styles."""
    first = tensors[st.keys(vocab[0])[0]]
    return first.shape[0] if first.ndim == 2 else None


def _check_keys(path: Path, tensors: Mapping[str, torch.Tensor], vocab: Vocabulary, st: formats.KeyStyle) -> None:
    """Every A and B of ``vocab`` present in style ``st``, nothing else but their alphas."""
    keys = [st.keys(m) for m in vocab]
    missing = [k for ka, kb, _ in keys for k in (ka, kb) if k not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing, {st.name} format)")
    known = {k for triple in keys for k in triple}
    unexpected = sorted(set(tensors) - known)
    if unexpected:
        hit = formats.module_of(unexpected[0])
        why = (f"blocks.{hit[0]}.{hit[1]} is not among the adapted matrices ({len(vocab)}: "
               f"{', '.join(vocab.modules)} of {vocab.num_blocks} blocks)" if hit else "not a LoRA key lofa reads")
        raise ArtifactError(f"{path}: unexpected key {unexpected[0]!r} ({len(unexpected)} not in the vocabulary; "
                            f"{why})")


def _factors(path: Path, tensors: Mapping[str, torch.Tensor], m: AdaptedMatrix, st: formats.KeyStyle,
             rank: int | None, default_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix ``m``'s validated A (r, in) and B (out, r), its alpha / r folded into B."""
    ka, kb, kalpha = st.keys(m)
    a, b = tensors[ka], tensors[kb]
    if rank is None and a.ndim != 2:
        raise ArtifactError(f"{path}: {ka!r} has shape {tuple(a.shape)}, expected (rank, {m.in_features})")
    r = rank if rank is not None else a.shape[0]
    for key, t, shape in ((ka, a, (r, m.in_features)), (kb, b, (m.out_features, r))):
        if tuple(t.shape) != shape:
            raise ArtifactError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {shape} (rank {r})")
        if t.dtype not in _FLOAT_DTYPES:
            raise ArtifactError(f"{path}: {key!r} has dtype {t.dtype}, expected one of {list(_FLOAT_DTYPES)}")
        if not torch.isfinite(t).all():
            raise ArtifactError(f"{path}: {key!r} contains NaN or inf")
    scale = default_scale
    if kalpha in tensors:
        scale = formats.alpha_value(path, kalpha, tensors[kalpha]) / r
    if scale is None or scale == 1.0:
        return a, b
    return a, b.float() * scale

# --------------------------------------------------------------------------- response maps

def delta_response_map(dW: torch.Tensor, W: torch.Tensor, tau: float = 0.02) -> torch.Tensor:
    """The response map, defined once: R = |dW / W| > tau, as a bool map of dW's shape.

    Computed as ``|dW| > tau |W|`` in float32, so where W == 0, R is true exactly when
    dW != 0 (as the ratio's IEEE value: |dW| / 0 = inf > tau, 0 / 0 = NaN is not). Every
    map in lofa (fit statistics, stage I's target and prediction, its Triton loss,
    evaluation) is this one. dW, W: (..., out, in), broadcastable.
    """
    return dW.float().abs() > tau * W.float().abs()


def response_map(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor, tau: float = 0.02) -> torch.Tensor:
    """:func:`delta_response_map` of dW = B A. A: (..., rank, in), B: (..., out, rank), W: (..., out, in)."""
    return delta_response_map(B.float() @ A.float(), W, tau)


def map_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(3,) float: true positives, predicted positives, actual positives of two bool maps (pooled)."""
    return torch.stack([(pred & target).sum(), pred.sum(), target.sum()]).float()


def map_scores(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall and F1 from pooled :func:`map_counts` (summed over any set of matrices):
    tp / pp, tp / ap, 2 tp / (pp + ap); each 0 where its denominator is 0."""
    tp, pp, ap = counts
    return {"precision": tp / pp.clamp_min(1), "recall": tp / ap.clamp_min(1), "f1": 2 * tp / (pp + ap).clamp_min(1)}


def dw_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-matrix dW cosine and relative error ||pred - target|| / ||target|| (Frobenius), each (n,).

    pred, target: (n, out, in). A zero matrix has cosine 0 (not NaN); a zero target gives
    relative error ||pred|| / tiny (huge), so such matrices are visible, not hidden.
    """
    p, t = pred.float().flatten(1), target.float().flatten(1)
    tiny = torch.finfo(torch.float32).tiny
    return {"dw_cos": torch.nn.functional.cosine_similarity(p, t, dim=1),
            "dw_rel_err": (p - t).norm(dim=1) / t.norm(dim=1).clamp_min(tiny)}


def response_stats(A: Sequence[torch.Tensor], B: Sequence[torch.Tensor], W: Sequence[torch.Tensor],
                   vocab: Vocabulary, tau: float = 0.02) -> dict[str, object]:
    """Share of responding entries: overall, per block (list), per module type (dict), per matrix (list)."""
    counts = [(m, int(response_map(a, b, w.to(a.device), tau).sum()), m.out_features * m.in_features)
              for m, a, b, w in zip(vocab, A, B, W)]

    def share(sel: list[tuple[object, int, int]]) -> float:
        return sum(c for _, c, _ in sel) / max(1, sum(n for _, _, n in sel))

    return {
        "tau": tau,
        "fraction": share(counts),
        "by_block": [share([c for c in counts if c[0].block == i]) for i in range(vocab.num_blocks)],
        "by_module": {mod: share([c for c in counts if c[0].module == mod]) for mod in vocab.modules},
        "by_matrix": [c / n for _, c, n in counts],  # vocabulary order (block-major)
    }
