"""Stage I + stage II of one prompt as a single CUDA graph.

The serving path of a trained hypernetwork (``Predictor`` on a GPU) runs the same
few hundred kernels for every prompt of a given text length. Launched one by one
from Python they leave the GPU idle between kernels (about 5 ms of a 67 ms
prediction at the Wan2.1-1.3B shapes, benchmarks/bench_hypernet.py); replayed from a
captured graph they run back to back.

Running stage II's first blocks on a second stream beside stage I gained nothing and was
removed (docs/performance.md, "Removed after measuring no gain").

What a replay needs is fixed at capture: the embedded matrices (``HyperNet.embed``,
one prompt), the models' weights (read in place: later in-place updates are seen,
replaced tensors are not), the text length, and whether the text comes with a key mask
(``masked``): without one every token must be valid (``trim_text`` gives that for one
prompt); with one, a text padded to a fixed length (``lofa.serving.predict.text_bucket``) serves
prompts of any length up to it from one graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from lofa.hypernet import HyperNet
from lofa.hypertypes import EmbeddedGroup, HyperOutput


class PredictionGraph:
    """A captured stage-I + stage-II prediction for one prompt of ``text_len`` tokens.

    Args:
        stage1: the stage-I model, or None for a stage-II model without stage-I features.
        stage2: the stage-II model.
        groups1, groups2: each model's embedded matrices for one prompt (same order).
        text_len: tokens of the text every call passes.
        masked: calls pass a (1, text_len) key mask with the text (False: every token is valid).
        context: a factory of the context to trace in (e.g. autocast with its cache off).
        graph: False runs the same schedule without capturing (for comparisons and CPU).
        pool: a graph memory pool to share with other PredictionGraphs (never replayed at once).
    """

    def __init__(self, stage1: HyperNet | None, stage2: HyperNet, groups1: Sequence[EmbeddedGroup] | None,
                 groups2: Sequence[EmbeddedGroup], text_len: int, *, masked: bool = False,
                 context: type[AbstractContextManager] | None = None, graph: bool = True,
                 pool: object | None = None, warmup: int = 2) -> None:
        if stage2.cfg.uses_stage1 != (stage1 is not None and groups1 is not None):
            raise ValueError("PredictionGraph: stage1 and groups1 are needed exactly when stage II uses stage-I "
                             "tokens")
        for groups, model in ((groups1 or (), stage1), (groups2, stage2)):
            for e in groups:
                if e.model_id != id(model):
                    raise ValueError("PredictionGraph: an EmbeddedGroup made by another model")
                if not torch.equal(e.group.prompt_ids.cpu(), torch.zeros(e.tokens.shape[0], dtype=torch.long)):
                    raise ValueError("PredictionGraph: embedded groups must hold the matrices of one prompt")
        self.stage1, self.stage2 = stage1, stage2
        self.groups1, self.groups2 = list(groups1 or ()), list(groups2)
        self.device = groups2[0].tokens.device
        self.text_len = text_len
        self.context = context or nullcontext
        self.use_graph = graph and self.device.type == "cuda"
        self.text = torch.zeros(1, text_len, stage2.cfg.text_dim, device=self.device,
                                dtype=groups2[0].tokens.dtype)
        self.mask = torch.ones(1, text_len, dtype=torch.bool, device=self.device) if masked else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[HyperOutput] = []
        if self.use_graph:
            self._capture(pool, warmup)

    @property
    def pool(self) -> object | None:
        """The graph's memory pool (pass it to another PredictionGraph to share memory)."""
        return None if self.graph is None else self.graph.pool()

    def _capture(self, pool: object | None, warmup: int) -> None:
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(warm), torch.no_grad(), self.context():
            for _ in range(warmup):  # compiled blocks compile and cuBLAS picks its kernels here
                self._forward(self.text, self.mask)
        torch.cuda.current_stream(self.device).wait_stream(warm)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), self.context(), torch.cuda.graph(self.graph, pool=pool):
            self.outputs = self._forward(self.text, self.mask)

    def _forward(self, text: Tensor, mask: Tensor | None) -> list[HyperOutput]:
        s1, s2 = self.stage1, self.stage2
        tokens1: list[Tensor | None] = [None] * len(self.groups2)
        if s1 is not None:
            ctx1 = s1.text_context(text, mask)
            tokens1 = [s1.final_tokens(s1.run_blocks(e.tokens, ctx1, mask=mask, first_cached=True))
                       for e in self.groups1]
        ctx2 = s2.text_context(text, mask)
        return [s2.finish(s2.run_blocks(e.tokens, ctx2, mask=mask, stage1_tokens=t1, first_cached=True),
                          e.group.shape, e.rms) for e, t1 in zip(self.groups2, tokens1)]

    @torch.no_grad()
    def __call__(self, text: Tensor, mask: Tensor | None = None) -> list[HyperOutput]:
        """One prediction per stage-II group for ``text`` (1, text_len, text_dim) and, for a graph
        made ``masked``, its key mask (1, text_len) bool, True = token (else every token is valid).

        Returns new tensors (the graph's own outputs are overwritten by the next call).
        """
        outs = self.replay(text, mask)
        if self.graph is None:
            return outs
        return [HyperOutput(o.A.clone(), o.B.clone(), None if o.alpha is None else o.alpha.clone(),
                            o.tokens.clone()) for o in outs]

    @torch.no_grad()
    def replay(self, text: Tensor, mask: Tensor | None = None) -> list[HyperOutput]:
        """As ``__call__``, but a captured graph returns its own output tensors, which the next call
        overwrites: for a caller that reads them at once (``Predictor`` converts A and B to fp32),
        with no copies (stage II's tokens alone are 95 MB at the Wan2.1-1.3B shapes)."""
        if text.shape != self.text.shape:
            raise ValueError(f"PredictionGraph: captured for text {tuple(self.text.shape)}, got {tuple(text.shape)}")
        if (mask is None) != (self.mask is None):
            raise ValueError("PredictionGraph: a key mask is needed exactly when the graph was made masked")
        if mask is not None and (mask.shape != self.mask.shape or mask.dtype != torch.bool):
            raise ValueError(f"PredictionGraph: mask must be bool {tuple(self.mask.shape)}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        if self.graph is None:
            with self.context():
                return self._forward(text.to(self.text.dtype), None if mask is None else mask.to(self.device))
        self.text.copy_(text)
        if mask is not None:
            self.mask.copy_(mask)
        self.graph.replay()
        return self.outputs
