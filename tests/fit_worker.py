"""One process of the multi-process fitting test (run by torchrun / accelerate launch).

Usage: fit_worker.py <spec.json> <out_dir>; spec holds the DiT config, the fit
config and the clip records. Every process builds the same tiny DiT from seed 0.
"""

from __future__ import annotations

import json
import sys

import torch

from lofa.config import from_dict
from lofa.fit import ClipRecord, FitConfig, fit_shard_distributed
from lofa.wan import WanDiTConfig, build_dit


def main(spec_path: str, out_dir: str) -> None:
    spec = json.loads(open(spec_path).read())
    dit_cfg = from_dict(WanDiTConfig, spec["dit"])
    cfg = from_dict(FitConfig, spec["fit"])
    records = [ClipRecord(**r) for r in spec["records"]]

    def build(device: torch.device) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_dit(dit_cfg, device=device)

    report = fit_shard_distributed(build, records, out_dir, cfg, cpu=True, progress=False)
    print(json.dumps({"shard": report.shard_index, "of": report.num_shards, "fitted": list(report.fitted)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
