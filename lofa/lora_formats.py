"""The formats Wan LoRAs travel in: the key styles lofa reads, the metadata it writes, model cards.

Every LoRA file lofa loads goes through :func:`lofa.lora.load_lora`, which asks this module
which style a file's keys are in and converts them to lofa's factors: A (rank, in) and
B (out, rank) with every scale folded into B. Styles (``p`` = ``blocks.{i}.{module}`` in
the Wan DiT's own names, ``q`` = ``p`` with every ``.`` as ``_``):

=============  =====================================================  ====================
style          A / B keys                                             written by
=============  =====================================================  ====================
``export``     ``diffusion_model.{p}.lora_A.weight`` / ``lora_B``     lofa (DESIGN 4)
``comfy``      ``diffusion_model.{p}.lora_down.weight`` / ``lora_up`` ComfyUI, LightX2V
``kohya``      ``lora_unet_{q}.lora_down.weight`` / ``lora_up``       musubi-tuner, kohya
``diffusers``  ``transformer.{d}.lora_A.weight`` / ``lora_B``         diffusers / PEFT
``diffsynth``  ``{p}.lora_A.default.weight`` / ``lora_B.default``     DiffSynth's trainer
``peft``       ``base_model.model.{p}.lora_A.default.weight`` / ...   ``get_peft_model``
=============  =====================================================  ====================

``d`` is diffusers' ``WanTransformer3DModel`` name: ``self_attn``/``cross_attn`` are
``attn1``/``attn2``, ``q k v o`` are ``to_q to_k to_v to_out.0``, ``ffn.0``/``ffn.2`` are
``ffn.net.0.proj``/``ffn.net.2`` (diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers``).
Any style may carry ``{module}.alpha`` (a scalar): the LoRA is then ``alpha / rank * B A``,
as musubi-tuner, ComfyUI and diffusers apply it. A diffusers file may instead record
``lora_alpha`` and ``r`` in its ``lora_adapter_metadata`` header (PEFT's scaling).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

import lofa
from lofa.io import ArtifactError, write_text
from lofa.layers import ALL_MODULES, AdaptedMatrix, Vocabulary

#: ``modelspec.architecture`` of every file lofa writes: musubi-tuner's id for Wan2.1 LoRAs
#: (``ARCH_WAN`` + ``/lora`` in its ``utils/sai_model_spec.py``; the official Wan2.1 weights
#: carry no model spec), so LoRA managers file lofa's LoRAs with the ones trained there.
ARCHITECTURE = "wan2.1/lora"
IMPLEMENTATION = "https://github.com/Wan-Video/Wan2.1"
SAI_MODEL_SPEC = "1.0.0"
#: The license line of model cards: the Wan2.1 weights' license (lofa adds no terms of its own).
LICENSE = "apache-2.0"

_DIFFUSERS_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0"}
_DIFFUSERS_FFN = {"ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
#: Wan2.1 DiTs lofa can name on a model card: (dim, ffn_dim, num_layers) -> Hugging Face id.
_KNOWN_BASES = {(1536, 8960, 30): "Wan-AI/Wan2.1-T2V-1.3B", (5120, 13824, 40): "Wan-AI/Wan2.1-T2V-14B"}


def _diffusers_name(block: int | str, module: str) -> str:
    """diffusers' WanTransformer3DModel name of a Wan DiT module."""
    if module in _DIFFUSERS_FFN:
        return f"blocks.{block}.{_DIFFUSERS_FFN[module]}"
    attn, proj = module.split(".")
    return f"blocks.{block}.{'attn1' if attn == 'self_attn' else 'attn2'}.{_DIFFUSERS_PROJ[proj]}"


@dataclass(frozen=True)
class KeyStyle:
    """One way of naming a LoRA's tensors: a module name per adapted matrix and the A/B suffixes."""

    name: str
    module_name: Callable[[int | str, str], str]
    down: str
    up: str

    def keys(self, m: AdaptedMatrix) -> tuple[str, str, str]:
        """(A key, B key, alpha key) of matrix ``m``."""
        base = self.module_name(m.block, m.module)
        return base + self.down, base + self.up, base + ".alpha"

    def pattern(self, module: str) -> re.Pattern[str]:
        """Matches any key of ``module`` in this style, whatever its block (group 1: the block)."""
        base = re.escape(self.module_name("BLOCK", module)).replace("BLOCK", r"(\d+)")
        suffixes = "|".join(re.escape(s) for s in (self.down, self.up, ".alpha"))
        return re.compile(f"{base}(?:{suffixes})")


STYLES: tuple[KeyStyle, ...] = (
    KeyStyle("export", lambda b, m: f"diffusion_model.blocks.{b}.{m}", ".lora_A.weight", ".lora_B.weight"),
    KeyStyle("comfy", lambda b, m: f"diffusion_model.blocks.{b}.{m}", ".lora_down.weight", ".lora_up.weight"),
    KeyStyle("kohya", lambda b, m: f"lora_unet_blocks_{b}_{m.replace('.', '_')}", ".lora_down.weight",
             ".lora_up.weight"),
    KeyStyle("diffusers", lambda b, m: f"transformer.{_diffusers_name(b, m)}", ".lora_A.weight", ".lora_B.weight"),
    KeyStyle("diffsynth", lambda b, m: f"blocks.{b}.{m}", ".lora_A.default.weight", ".lora_B.default.weight"),
    KeyStyle("peft", lambda b, m: f"base_model.model.blocks.{b}.{m}", ".lora_A.default.weight",
             ".lora_B.default.weight"),
)
STYLE_NAMES: tuple[str, ...] = tuple(s.name for s in STYLES)
#: Styles whose files may hold a rank per matrix (kohya's dynamic resize, ComfyUI's extraction);
#: lofa, DiffSynth's trainer and PEFT write one rank, so another one there is damage.
PER_MATRIX_RANK: tuple[str, ...] = ("comfy", "kohya", "diffusers")


def style(name: str) -> KeyStyle:
    """The key style called ``name`` (one of :data:`STYLE_NAMES`)."""
    for s in STYLES:
        if s.name == name:
            return s
    raise ValueError(f"unknown LoRA key style {name!r}; valid: {list(STYLE_NAMES)}")


def detect_style(path: Path, keys: Iterable[str], vocab: Vocabulary) -> KeyStyle:
    """The style most of ``keys`` are in, for ``vocab``'s matrices; fails naming the file and a key."""
    keys = set(keys)
    hits = {s.name: sum(k in keys for m in vocab for k in s.keys(m)) for s in STYLES}
    best = max(STYLES, key=lambda s: hits[s.name])
    if hits[best.name] == 0:
        first = sorted(keys)[0] if keys else "(no tensors)"
        raise ArtifactError(f"{path}: no LoRA key of the formats {list(STYLE_NAMES)} for this vocabulary; "
                            f"first key: {first!r}")
    return best


@functools.cache
def _patterns() -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((s.pattern(module), module) for s in STYLES for module in ALL_MODULES)


def module_of(key: str) -> tuple[int, str] | None:
    """(block, module) of a LoRA key in any style, None for a key of no module lofa knows."""
    for pattern, module in _patterns():
        hit = pattern.fullmatch(key)
        if hit:
            return int(hit.group(1)), module
    return None


def modules_in(keys: Iterable[str]) -> list[str]:
    """The Wan DiT modules (of :data:`lofa.layers.ALL_MODULES`, in its order) that ``keys`` adapt."""
    found = {hit[1] for hit in map(module_of, keys) if hit is not None}
    return [m for m in ALL_MODULES if m in found]


def adapter_scale(path: Path, metadata: Mapping[str, str]) -> float | None:
    """PEFT's ``lora_alpha / r`` from diffusers' ``lora_adapter_metadata`` header, None without one.

    Per-module patterns (``alpha_pattern``, ``rank_pattern``) and DoRA are refused: lofa
    would apply another LoRA than the file's.
    """
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: header 'lora_adapter_metadata' is not JSON ({e})") from None
    cfg = {k.removeprefix("transformer."): v for k, v in cfg.items()} if isinstance(cfg, dict) else {}
    for key in ("alpha_pattern", "rank_pattern", "use_dora"):
        if cfg.get(key):
            raise ArtifactError(f"{path}: header 'lora_adapter_metadata' sets {key!r} ({cfg[key]!r}), "
                                f"which lofa does not apply")
    if "lora_alpha" not in cfg or "r" not in cfg:
        return None
    alpha, r = float(cfg["lora_alpha"]), float(cfg["r"])
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def alpha_value(path: Path, key: str, t: torch.Tensor) -> float:
    """A ``.alpha`` tensor as a float: one finite real number, or fail naming file and key."""
    if t.numel() != 1 or t.ndim > 1:
        raise ArtifactError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected a scalar")
    if t.is_complex() or t.dtype == torch.bool:
        raise ArtifactError(f"{path}: {key!r} has dtype {t.dtype}, expected a real number")
    value = float(t.reshape(()))
    if not math.isfinite(value):
        raise ArtifactError(f"{path}: {key!r} is {value}, expected a finite number")
    return value


# --------------------------------------------------------------------------- metadata lofa writes

def dit_width(vocab: Vocabulary) -> int:
    """The DiT width (``dim``) of ``vocab``'s matrices (FFN matrices map it to ``ffn_dim`` and back)."""
    m = vocab[0]
    return m.out_features if m.module == "ffn.2" else m.in_features


def base_model_id(vocab: Vocabulary) -> str | None:
    """The Hugging Face id of the Wan2.1 DiT ``vocab`` was made from, None for another shape."""
    dim = dit_width(vocab)
    ffn = next((m.out_features for m in vocab if m.module == "ffn.0"), None)
    for (d, f, n), name in _KNOWN_BASES.items():
        if d == dim and n == vocab.num_blocks and ffn in (None, f):
            return name
    return None


def short(text: str, limit: int = 80) -> str:
    """``text`` on one line, cut to ``limit`` characters (an ellipsis marks a cut)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def modelspec(rank: int, title: str, description: str, date: datetime | None) -> dict[str, str]:
    """The header entries LoRA managers display (SAI ModelSpec + kohya's ``ss_network_*``).

    lofa folds every scale into B, so the network alpha is the rank (alpha / rank = 1), as
    loaders read it. ``date`` only on files that are not pipeline outputs: a dated header
    would make a rerun's bytes differ and DVC rerun what follows.
    """
    out = {"modelspec.sai_model_spec": SAI_MODEL_SPEC, "modelspec.architecture": ARCHITECTURE,
           "modelspec.implementation": IMPLEMENTATION, "modelspec.title": title,
           "modelspec.description": description, "ss_network_dim": str(rank), "ss_network_alpha": f"{float(rank)}"}
    if date is not None:
        out["modelspec.date"] = date.replace(microsecond=0).isoformat()
    return out


# --------------------------------------------------------------------------- model cards

def card_path(lora_path: str | Path) -> Path:
    """Where the model card of ``lora_path`` goes: beside it, ``<stem>.md``."""
    p = Path(lora_path)
    return p.with_name(p.stem + ".md")


def _front_matter(fields: Mapping[str, object]) -> str:
    return "---\n" + yaml.safe_dump(dict(fields), sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def lora_card(metadata: Mapping[str, str], vocab: Vocabulary, how_made: str) -> str:
    """A model card (Markdown, YAML front matter) for a LoRA file with header ``metadata``."""
    base_id = base_model_id(vocab)
    prompt = metadata.get("prompt", "")
    fields: dict[str, object] = {"base_model": base_id} if base_id else {}
    fields |= {"base_model_hash": metadata.get("base_model_hash", ""), "instance_prompt": prompt,
               "tags": ["lora", "wan2.1", "text-to-video", "lofa"], "license": LICENSE,
               "library_name": "lofa", "rank": int(metadata["rank"]), "producer": metadata["producer"]}
    base = base_id or f"a Wan DiT of {vocab.num_blocks} blocks, width {dit_width(vocab)} (lofa's synthetic profile)"
    modules = ", ".join(vocab.modules)
    return _front_matter(fields) + "\n".join([
        f"# {metadata.get('modelspec.title', short(prompt))}", "",
        metadata.get("modelspec.description", ""), "",
        f"- **Base model**: {base}; content hash `{metadata.get('base_model_hash', '')}`",
        f"- **Prompt**: {prompt}",
        f"- **How it was made**: {how_made}",
        f"- **Rank**: {metadata['rank']} on {len(vocab)} matrices ({modules} of {vocab.num_blocks} blocks); "
        "every scale is folded into `lora_B` (alpha = rank)",
        f"- **Producer**: {metadata['producer']}",
        f"- **License**: {LICENSE} (the Wan2.1 weights' license; lofa adds no terms)", "",
        "## Keys", "",
        "`diffusion_model.blocks.{i}.{module}.lora_A.weight` (rank x in) and `...lora_B.weight` (out x rank), "
        "safetensors. ComfyUI's LoRA loader, diffusers' `WanPipeline.load_lora_weights` and DiffSynth's "
        "`GeneralLoRALoader` load it as it is (lofa's tests check each).", ""])


def write_lora_card(lora_path: str | Path, metadata: Mapping[str, str], vocab: Vocabulary, how_made: str) -> Path:
    """Write :func:`lora_card` beside ``lora_path`` atomically; returns the card's path."""
    path = card_path(lora_path)
    write_text(path, lora_card(metadata, vocab, how_made))
    return path


def hypernet_card(name: str, base_model_hash: str, stages: Mapping[str, Mapping[str, object]]) -> str:
    """The model card of the registered hypernetwork ``name``.

    Args:
        stages: ``{"stage1": meta, "stage2": meta}`` (stage 1 absent for the one-stage
            ablation), each with ``config`` and ``weights_hash``.
    """
    fields = {"base_model_hash": base_model_hash, "tags": ["lofa", "hypernetwork", "lora", "wan2.1"],
              "license": LICENSE, "library_name": "lofa", "producer": f"lofa {lofa.__version__}"}
    lines = [f"# {name}", "",
             "The LoFA hypernetwork (arXiv 2512.08785): reads the base DiT's weights and a prompt and "
             "predicts a LoRA for it (`lofa predict`, or `lofa.serving.registry.load_predictor`).", "",
             f"- **Base model**: content hash `{base_model_hash}` (not copied into the registry)",
             "- **How it was made**: trained by lofa's pipeline (`dvc repro`): per-clip LoRAs fitted as "
             "supervision, stage I on their response maps, stage II on their weights",
             f"- **Producer**: lofa {lofa.__version__}",
             f"- **License**: {LICENSE} (the Wan2.1 weights' license; lofa adds no terms)", ""]
    for stage, meta in sorted(stages.items()):
        lines += [f"## {stage}", "", f"- weights hash `{meta.get('weights_hash', '')}`",
                  f"- config `{json.dumps(meta.get('config', {}), sort_keys=True)}`", ""]
    return _front_matter(fields) + "\n".join(lines)
