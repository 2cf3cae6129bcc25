"""The one vocabulary of adapted matrices: which linears of the Wan DiT get a LoRA,
their shapes (from the DiT config, never literals) and their key names in every
format lofa reads or writes.

Formats (prefix = ``blocks.{i}.{module}``):

- ``export``:    ``diffusion_model.{prefix}.lora_A.weight`` / ``lora_B.weight``
  (DESIGN section 4; ComfyUI, diffusers' Wan converter, DiffSynth load it).
- ``diffsynth``: ``{prefix}.lora_A.default.weight`` (DiffSynth's trainer output).
- ``peft``:      ``base_model.model.{prefix}.lora_A.default.weight``
  (``get_peft_model(WanModel)`` state-dict names).
- ``base``:      ``{prefix}.weight`` (the base DiT's own weight).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

#: Attention linears adapted by LoFA, in type-index order (8 module types).
ATTN_MODULES: tuple[str, ...] = tuple(
    f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q", "k", "v", "o")
)
#: Optional feed-forward linears.
FFN_MODULES: tuple[str, ...] = ("ffn.0", "ffn.2")
ALL_MODULES: tuple[str, ...] = ATTN_MODULES + FFN_MODULES

KeyFormat = Literal["export", "diffsynth", "peft"]
KEY_FORMATS: tuple[str, ...] = ("export", "diffsynth", "peft")
_LORA_TEMPLATES = {
    "export": ("diffusion_model.{p}.lora_A.weight", "diffusion_model.{p}.lora_B.weight"),
    "diffsynth": ("{p}.lora_A.default.weight", "{p}.lora_B.default.weight"),
    "peft": ("base_model.model.{p}.lora_A.default.weight", "base_model.model.{p}.lora_B.default.weight"),
}


@dataclass(frozen=True)
class AdaptedMatrix:
    """One adapted linear: ``W`` has shape (out_features, in_features)."""

    block: int
    module: str
    out_features: int
    in_features: int

    @property
    def prefix(self) -> str:
        return f"blocks.{self.block}.{self.module}"

    @property
    def type_index(self) -> int:
        """Index of the module type (0..len(ALL_MODULES)-1), for type embeddings."""
        return ALL_MODULES.index(self.module)

    @property
    def base_key(self) -> str:
        return f"{self.prefix}.weight"

    def lora_keys(self, fmt: KeyFormat = "export") -> tuple[str, str]:
        """(A key, B key) in ``fmt``."""
        if fmt not in _LORA_TEMPLATES:
            raise ValueError(f"unknown LoRA key format {fmt!r}; valid: {list(KEY_FORMATS)}")
        a, b = _LORA_TEMPLATES[fmt]
        return a.format(p=self.prefix), b.format(p=self.prefix)


def module_shape(module: str, dim: int, ffn_dim: int) -> tuple[int, int]:
    """(out, in) of ``module`` in a Wan block of width ``dim`` and FFN width ``ffn_dim``."""
    if module in ATTN_MODULES:
        return dim, dim
    if module == "ffn.0":
        return ffn_dim, dim
    if module == "ffn.2":
        return dim, ffn_dim
    raise ValueError(f"unknown module {module!r}; valid: {list(ALL_MODULES)}")


@dataclass(frozen=True)
class Vocabulary:
    """All adapted matrices of one base model, in a fixed order (block-major)."""

    matrices: tuple[AdaptedMatrix, ...]

    @classmethod
    def from_dims(cls, dim: int, ffn_dim: int, num_layers: int,
                  modules: Iterable[str] = ATTN_MODULES) -> "Vocabulary":
        modules = tuple(modules)
        for m in modules:
            module_shape(m, dim, ffn_dim)  # validates the name
        mats = tuple(
            AdaptedMatrix(i, m, *module_shape(m, dim, ffn_dim))
            for i in range(num_layers) for m in modules
        )
        return cls(mats)

    @classmethod
    def from_dit_config(cls, cfg: Mapping[str, object] | object,
                        modules: Iterable[str] = ATTN_MODULES) -> "Vocabulary":
        """From a DiT config (a mapping or an object with ``dim``, ``ffn_dim``, ``num_layers``)."""
        get = (lambda k: cfg[k]) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k))
        return cls.from_dims(int(get("dim")), int(get("ffn_dim")), int(get("num_layers")), modules)

    def __len__(self) -> int:
        return len(self.matrices)

    def __iter__(self) -> Iterator[AdaptedMatrix]:
        return iter(self.matrices)

    def __getitem__(self, i: int) -> AdaptedMatrix:
        return self.matrices[i]

    @property
    def num_blocks(self) -> int:
        return 1 + max(m.block for m in self.matrices)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.module for m in self.matrices))

    def index(self, prefix: str) -> int:
        for i, m in enumerate(self.matrices):
            if m.prefix == prefix:
                return i
        raise KeyError(f"{prefix!r} is not an adapted matrix")

    def lora_keys(self, fmt: KeyFormat = "export") -> list[str]:
        """Every A and B key in ``fmt``, in vocabulary order."""
        return [k for m in self.matrices for k in m.lora_keys(fmt)]

    def lora_shapes(self, rank: int, fmt: KeyFormat = "export") -> dict[str, tuple[int, int]]:
        """Expected shape of every LoRA tensor: A is (rank, in), B is (out, rank)."""
        out: dict[str, tuple[int, int]] = {}
        for m in self.matrices:
            a, b = m.lora_keys(fmt)
            out[a] = (rank, m.in_features)
            out[b] = (m.out_features, rank)
        return out

    def num_lora_params(self, rank: int) -> int:
        return sum(rank * (m.in_features + m.out_features) for m in self.matrices)

    def convert_keys(self, tensors: Mapping[str, object], src: KeyFormat,
                     dst: KeyFormat) -> dict[str, object]:
        """Rename LoRA tensors from format ``src`` to ``dst`` (unknown keys raise)."""
        table = {}
        for m in self.matrices:
            for s, d in zip(m.lora_keys(src), m.lora_keys(dst)):
                table[s] = d
        unknown = [k for k in tensors if k not in table]
        if unknown:
            raise KeyError(f"keys not in the {src!r} vocabulary, first: {unknown[0]!r}")
        return {table[k]: v for k, v in tensors.items()}
