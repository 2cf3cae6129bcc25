"""Would folding the layer norms into the matrix products bring the prediction under 50 ms? (CUDA, bf16)

A prediction at the Wan2.1-1.3B shapes spends about 4.3 of its 57 ms in 68 layer-norm passes
(benchmarks/bench_hypernet.py's profile). cuBLAS cannot fold them: a folded norm scales each
token's row of the product, and cuBLASLt's vectors run along the output features. So this
benchmark builds CUTLASS sm90 GEMMs that do (benchmarks/fused_norms.cu): the pre-norm products
read the stream itself and apply mu / rstd in the epilogue, and the residual products add each
row's sum and sum of squares as they write the stream. No norm pass is left.

It times 16 trunk blocks' products (qkv, output projection, fc1 + GELU, fc2, cross-attention q,
output projection, fc1 + GELU, fc2; the attention outputs are a fixed tensor) three ways, each
captured in one CUDA graph and the three replayed in turn, back to back, as a prediction runs:
  cublas_ln      what lofa runs: compiled norm passes, cuBLAS(Lt) products with their GELU and
                 residual epilogues;
  fused          the CUTLASS products with the norms folded in;
  products_only  the cuBLAS products with no norms at all: no way of fusing the norms can beat it.
Each fused product is also checked against fp32 and timed alone, as is a norm pass. Prints JSON; writes
$OUT/fused_norms.json when OUT is set.

    python3 benchmarks/fused_norms.py --cutlass DIR   # DIR: CUTLASS's include/ (cute/ and cutlass/);
                                                       # flashinfer-python's wheel carries one at
                                                       # flashinfer/data/cutlass/include
    python3 benchmarks/fused_norms.py --lib fused_norms.so   # built already (see the .cu's header)
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hypernet import call_ms, gpu_state, rel_err, timeit  # noqa: E402
from lofa.kernels import cublaslt  # noqa: E402

SOURCE = Path(__file__).with_suffix(".cu")
M, D, H, EPS = 240 * 257, 768, 3072, 1e-6
_P, _I, _F, _S = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_size_t
FOLD_ARGS = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _F, _P, _S, _P]
STATS_ARGS = [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _P, _S, _P]


def build(cutlass: Path) -> Path:
    """Compile fused_norms.cu for sm_90a (cached by the source's hash); returns the library."""
    if not (cutlass / "cutlass" / "cutlass.h").is_file() or not (cutlass / "cute").is_dir():
        raise SystemExit(f"fused_norms: {cutlass} is not a CUTLASS include directory (no cutlass/cutlass.h, cute/)")
    if shutil.which("nvcc") is None:
        raise SystemExit("fused_norms: nvcc is not on PATH")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    lib = Path(tempfile.gettempdir()) / f"lofa_fused_norms_{digest}.so"
    if not lib.is_file():
        tmp = lib.with_suffix(".tmp.so")
        cmd = ["nvcc", "-std=c++17", "-arch=sm_90a", "-O3", "--expt-relaxed-constexpr", "-DNDEBUG", "-Xcompiler",
               "-fPIC", "-shared", "-cudart", "static", f"-I{cutlass}", "-o", str(tmp), str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"fused_norms: nvcc failed on {SOURCE}:\n{done.stderr[-4000:]}")
        tmp.replace(lib)
    return lib


class Kernels:
    """The library's entry points, called on the current stream with a shared workspace."""

    def __init__(self, path: Path):
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # CUTLASS's TMA descriptors use the driver API
        self.lib = ctypes.CDLL(str(path))
        for name in ("fold_gelu_ping_64x256", "fold_coop_128x256", "fold_ping_64x256"):
            getattr(self.lib, name).argtypes = FOLD_ARGS
        for name in ("stats_coop_128x256", "stats_ping_64x256"):
            getattr(self.lib, name).argtypes = STATS_ARGS
        self.ws = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")

    def _check(self, name: str, rc: int) -> None:
        if rc:
            raise RuntimeError(f"fused_norms: {name} returned {rc} (1 shape, 2 workspace, 3 init, 4 launch, 5 CUDA)")

    def fold(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, stats: torch.Tensor, c: torch.Tensor,
             b: torch.Tensor, gelu: bool) -> None:
        """y = [GELU](LN(x) W^T + b) with the norm folded (w, c, b from ``fold_weights``); stats (2, M)."""
        n = w.shape[0]
        name = "fold_gelu_ping_64x256" if gelu else "fold_coop_128x256" if n > D else "fold_ping_64x256"
        stream = torch.cuda.current_stream().cuda_stream
        self._check(name, getattr(self.lib, name)(
            x.data_ptr(), w.data_ptr(), y.data_ptr(), stats[0].data_ptr(), stats[1].data_ptr(), c.data_ptr(),
            b.data_ptr(), x.shape[0], n, x.shape[1], EPS, self.ws.data_ptr(), self.ws.numel(), stream))

    def residual(self, h: torch.Tensor, linear: torch.nn.Linear, r: torch.Tensor, y: torch.Tensor,
                 stats: torch.Tensor) -> None:
        """y = h W^T + b + r, with each row's sum and sum of squares added into stats (2, M)."""
        name = "stats_coop_128x256" if h.shape[1] > D else "stats_ping_64x256"
        stream = torch.cuda.current_stream().cuda_stream
        self._check(name, getattr(self.lib, name)(
            h.data_ptr(), linear.weight.data_ptr(), r.data_ptr(), y.data_ptr(), linear.bias.data_ptr(),
            stats[0].data_ptr(), stats[1].data_ptr(), h.shape[0], linear.out_features, h.shape[1],
            self.ws.data_ptr(), self.ws.numel(), stream))


def fold_weights(linear: torch.nn.Linear, norm: torch.nn.LayerNorm) -> tuple[torch.Tensor, ...]:
    """(g W in bf16, rowsum of it in fp32, b + W beta in fp32) for LN(x) W^T + b."""
    w = (linear.weight.float() * norm.weight.float()).to(linear.weight.dtype)
    return w, w.float().sum(1), linear.bias.float() + linear.weight.float() @ norm.bias.float()


class Block:
    """One trunk block's norms and linears at the Wan2.1-1.3B shapes (random weights)."""

    def __init__(self) -> None:
        def lin(i: int, o: int, std: float) -> torch.nn.Linear:
            layer = torch.nn.Linear(i, o, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                layer.weight.normal_(0, std)
                layer.bias.normal_(0, 0.05)
            return layer
        self.norms = [torch.nn.LayerNorm(D, eps=EPS, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        with torch.no_grad():
            for n in self.norms:
                n.weight.normal_(1, 0.1)
                n.bias.normal_(0, 0.05)
        self.inp = [lin(D, 3 * D, 0.03), lin(D, H, 0.03), lin(D, D, 0.03), lin(D, H, 0.03)]
        self.out = [lin(D, D, 0.02), lin(H, D, 0.02), lin(D, D, 0.02), lin(H, D, 0.02)]
        self.folded = [fold_weights(li, n) for li, n in zip(self.inp, self.norms)]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return round(rel_err(x, ref), 6)


def timed(fn: Callable[[], object]) -> float:
    """Median ms of 20 single calls after 3 warm-up calls (CUDA events)."""
    return round(timeit(fn, torch.device("cuda"), warmup=3, repeats=20)["median_ms"], 4)


def row_stats(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(2, M) fp32: each row's sum and sum of squares, as the residual products add them."""
    xf = x.float()
    return torch.stack([xf.sum(1), xf.pow(2).sum(1)], out=out)


def compiled_norm() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """LayerNorm(x) with gain and bias as inductor writes it in the compiled trunk: one pass."""
    return torch.compile(lambda t, g, b: F.layer_norm(t, (D,), g, b, EPS), dynamic=False)


def product(linear: torch.nn.Linear, x: torch.Tensor, gelu: bool) -> torch.Tensor:
    """x W^T + b, then GELU (tanh) in cuBLASLt's epilogue if asked: the trunk's no-grad products."""
    if gelu:
        return torch._addmm_activation(linear.bias, x, linear.weight.t(), use_gelu=True)
    return torch.addmm(linear.bias, x, linear.weight.t())


def check_products(k: Kernels, blk: Block, x: torch.Tensor, attn: torch.Tensor) -> dict[str, object]:
    """Each fused product against fp32 and the bf16 cuBLAS path, and its time alone."""
    res: dict[str, object] = {}
    stats = row_stats(x)
    for j, name in ((0, "qkv"), (1, "fc1_gelu"), (2, "cross_q")):
        li, norm, gelu = blk.inp[j], blk.norms[j], j == 1
        ln = norm(x)
        exact = F.linear(F.layer_norm(x.float(), (D,), norm.weight.float(), norm.bias.float(), EPS),
                         li.weight.float(), li.bias.float())
        exact = F.gelu(exact, approximate="tanh") if gelu else exact
        y = torch.empty(M, li.out_features, device="cuda", dtype=x.dtype)
        w, c, b = blk.folded[j]
        k.fold(x, w, y, stats, c, b, gelu)
        ref = product(li, ln, gelu)
        res[name] = {"fused_err_vs_fp32": rel(y, exact), "cublas_err_vs_fp32": rel(ref, exact),
                     "fused_ms": timed(lambda: k.fold(x, w, y, stats, c, b, gelu)),
                     "cublas_ms": timed(lambda: product(li, ln, gelu))}
    h = torch.randn(M, H, device="cuda", dtype=x.dtype)
    for j, name, inp in ((1, "fc2_residual", h), (0, "out_residual", attn)):
        lo = blk.out[j]
        y = torch.empty_like(x)
        s = torch.zeros(2, M, device="cuda")
        k.residual(inp, lo, x, y, s)
        ref = cublaslt.linear_residual(inp, lo, x)

        def fused() -> None:
            s.zero_()
            k.residual(inp, lo, x, y, s)
        res[name] = {"fused_err_vs_cublaslt": rel(y, ref), "sum_err": rel(s[0], y.float().sum(1)),
                     "sumsq_err": rel(s[1], y.float().pow(2).sum(1)), "fused_ms": timed(fused),
                     "cublaslt_ms": timed(lambda: cublaslt.linear_residual(inp, lo, x))}
    norm = compiled_norm()
    res["norm_pass_ms"] = timed(lambda: norm(x, blk.norms[0].weight, blk.norms[0].bias))
    return res


def chains(k: Kernels, blocks: list[Block], attn: torch.Tensor) -> dict[str, Callable]:
    """The three ways of running the blocks' products, each a function of the stream x (M, D)."""
    norm = compiled_norm()

    def cublas(x: torch.Tensor, with_norms: bool = True) -> torch.Tensor:
        for blk in blocks:
            for j in range(4):
                n, li = blk.norms[j], blk.inp[j]
                a = norm(x, n.weight, n.bias) if with_norms else x
                h = product(li, a, gelu=j % 2 == 1)
                x = cublaslt.linear_residual(h if j % 2 == 1 else attn, blk.out[j], x)
        return x

    streams = [torch.empty(M, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    stats = torch.zeros(2, 2, M, device="cuda")
    hidden = {n: torch.empty(M, n, device="cuda", dtype=torch.bfloat16) for n in (D, 3 * D, H)}

    def fused(x: torch.Tensor) -> torch.Tensor:
        s = row_stats(x, out=stats[0])
        i = 0
        for blk in blocks:
            for j in range(4):
                w, c, b = blk.folded[j]
                h = hidden[w.shape[0]]
                k.fold(x, w, h, s, c, b, gelu=j % 2 == 1)
                i ^= 1
                s, y = stats[i], streams[i]
                s.zero_()
                k.residual(h if j % 2 == 1 else attn, blk.out[j], x, y, s)
                x = y
        return x
    return {"cublas_ln": cublas, "fused": fused, "products_only": lambda x: cublas(x, with_norms=False)}


def graphed(fn: Callable, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(x)
    return graph, out


def main() -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--cutlass", type=Path, help="CUTLASS include directory (builds fused_norms.cu with nvcc)")
    src.add_argument("--lib", type=Path, help="fused_norms.cu built already")
    parser.add_argument("--blocks", type=int, default=16, help="trunk blocks in the chain (a prediction has 16)")
    parser.add_argument("--repeats", type=int, default=12, help="replays of each chain, in turn")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("fused_norms: needs an sm_90 GPU (H100 / H200)")
    k = Kernels(args.lib if args.lib else build(args.cutlass))
    torch.manual_seed(0)
    blocks = [Block() for _ in range(args.blocks)]
    x = (torch.randn(M, D, device="cuda") + 0.3 * torch.randn(M, 1, device="cuda")).to(torch.bfloat16)
    attn = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)  # stands in for the attention outputs
    res: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "blocks": args.blocks}
    with torch.no_grad():
        res["products"] = check_products(k, blocks[0], x, attn)
        graphs = {name: graphed(fn, x) for name, fn in chains(k, blocks, attn).items()}
        for g, _ in graphs.values():
            g.replay()
        torch.cuda.synchronize()
        ref = graphs["cublas_ln"][1]
        res["fused_stream_rel_diff"] = rel(graphs["fused"][1], ref)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(2 + args.repeats):  # each round replays every chain once, back to back
            for name, (g, _) in graphs.items():
                times[name].append(call_ms(g.replay, torch.device("cuda")))
        res["chain_ms_back_to_back"] = {name: round(statistics.median(t[2:]), 3) for name, t in times.items()}
        res["gpu_state_cublas_ln"] = gpu_state(graphs["cublas_ln"][0].replay)
        res["gpu_state_fused"] = gpu_state(graphs["fused"][0].replay)
        res["gpu_state_products_only"] = gpu_state(graphs["products_only"][0].replay)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "fused_norms.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
