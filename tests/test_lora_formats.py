"""LoRA files that travel (issue 21, part 3): every key style Wan LoRAs are shared in loads to the
LoRA it describes, lofa's files load in DiffSynth, diffusers and ComfyUI (by its key mapping rules)
with exactly lofa's effect, the header carries the metadata LoRA managers show, and bad files fail
naming the file and the key. Tiny shapes: the fast tier."""

from __future__ import annotations

import contextlib
import copy
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
import yaml

import lofa
from lofa import lora_formats as formats
from lofa.io import load_tensors, read_metadata, save_tensors, sha256_file
from lofa.layers import ALL_MODULES, Vocabulary
from lofa.lora import LoRAFormatError, LoRAWeights, base_weights, load_lora, save_lora
from lofa.wan import WanDiTConfig, build_dit, dit_forward

CFG = WanDiTConfig(dim=96, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)
VOCAB = Vocabulary.from_dit_config(CFG)
FULL = Vocabulary.from_dit_config(CFG, modules=ALL_MODULES)  # attention + FFN, as musubi-tuner trains
RANK = 4
META = {"prompt": "a small red figure waves", "base_model_hash": "abc123"}
# float32 throughout: a LoRA applied as two products (lofa, PEFT) and one merged into the weight
# (DiffSynth, ComfyUI, fused diffusers) differ by reassociation only, ~1e-6 relative on outputs of
# size ~1; 1e-4 / 1e-5 leave room for that and catch any wrong scale (>= 1e-2 relative here).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(2)
    return build_dit(CFG)


def _factors(vocab: Vocabulary, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(RANK, m.in_features, generator=g) * 0.2 for m in vocab],
            [torch.randn(m.out_features, RANK, generator=g) * 0.2 for m in vocab])


def _write_style(path: Path, vocab: Vocabulary, A, B, style: str, alpha: float | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """The LoRA B A in ``style``'s keys; with ``alpha``, B is stored divided by alpha / rank (as trainers do)."""
    st, tensors = formats.style(style), {}
    for m, a, b in zip(vocab, A, B):
        ka, kb, kalpha = st.keys(m)
        tensors[ka], tensors[kb] = a, b if alpha is None else b / (alpha / a.shape[0])
        if alpha is not None:
            tensors[kalpha] = torch.tensor(alpha)  # 0-dim, as musubi-tuner's buffer
    save_tensors(path, tensors, metadata)
    return path


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([100.0, 600.0]), torch.randn(2, 6, 32, generator=g)


def _deltas(lora) -> list[torch.Tensor]:
    return [b.float() @ a.float() for a, b in zip(lora.A, lora.B)]


# --------------------------------------------------------------------------- every style, lofa's application

@pytest.mark.parametrize("style", formats.STYLE_NAMES)
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_every_style_applies_as_the_lora_it_holds(tmp_path, dit, style, alpha):
    A, B = _factors(VOCAB)
    got = load_lora(_write_style(tmp_path / f"{style}.safetensors", VOCAB, A, B, style, alpha), VOCAB)
    assert got.key_format == style and got.rank == RANK
    x, t, c = _inputs()
    with torch.no_grad():
        want = dit_forward(copy.deepcopy(dit), x, t, c, lora=LoRAWeights.from_factors(VOCAB, A, B))
        out = dit_forward(copy.deepcopy(dit), x, t, c, lora=got.to_weights())
        assert (want - dit_forward(dit, x, t, c)).abs().mean() > 1e-3  # the LoRA matters
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)


def test_musubi_ffn_file_loads_whole_or_is_refused_naming_the_ffn_key(tmp_path):
    """A musubi-tuner file adapts the FFN too: with a vocabulary that has it (what load_user_lora builds
    from the file's keys) it loads whole; against the attention-only one it is refused, not cut."""
    A, B = _factors(FULL)
    path = _write_style(tmp_path / "musubi.safetensors", FULL, A, B, "kohya", alpha=1.0)
    assert formats.modules_in(load_tensors(path)) == list(ALL_MODULES)
    full = load_lora(path, FULL)
    for d, a, b in zip(_deltas(full), A, B):
        torch.testing.assert_close(d, b @ a, rtol=1e-5, atol=1e-7)
    with pytest.raises(LoRAFormatError, match=re.escape(f"{path}: unexpected key 'lora_unet_blocks_0_ffn_0.alpha'")
                       + r".*blocks\.0\.ffn\.0 is not among the adapted matrices"):
        load_lora(path, VOCAB)


def test_ranks_that_differ_per_matrix_are_padded_exactly(tmp_path):
    A, B = _factors(VOCAB)
    A[3], B[3] = A[3][:2], B[3][:, :2]  # kohya's dynamic resize leaves ranks per module
    got = load_lora(_write_style(tmp_path / "mixed.safetensors", VOCAB, A, B, "kohya", alpha=1.0), VOCAB)
    assert got.rank == RANK and got.A[3].shape == (RANK, CFG.dim)
    torch.testing.assert_close(_deltas(got)[3], B[3] @ A[3], rtol=1e-5, atol=1e-7)  # zero rows/columns add nothing
    with pytest.raises(LoRAFormatError, match=r"blocks_0_self_attn_o\.lora_down\.weight' has shape \(2, 96\), "
                                              r"expected \(4, 96\) \(rank 4\)"):
        load_lora(tmp_path / "mixed.safetensors", VOCAB, rank=RANK)
    # lofa, DiffSynth's trainer and PEFT write one rank: another one in their styles is damage
    with pytest.raises(LoRAFormatError, match=r"blocks\.0\.self_attn\.o\.lora_A\.weight' has shape \(2, 96\)"):
        load_lora(_write_style(tmp_path / "mixed_export.safetensors", VOCAB, A, B, "export"), VOCAB)


# --------------------------------------------------------------------------- alpha, against diffusers' converters

@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_alpha_scales_as_diffusers_converts_it(tmp_path, style):
    """diffusers' own converters (musubi ``lora_unet_*`` and ``diffusion_model.*`` down/up) give the
    same B A as lofa's reading, alpha included: an independent reading of the convention."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    A, B = _factors(FULL, seed=3)
    path = _write_style(tmp_path / f"{style}.safetensors", FULL, A, B, style, alpha=8.0)
    ours = load_lora(path, FULL)
    theirs = WanLoraLoaderMixin.lora_state_dict(str(path), use_safetensors=True)
    st = formats.style("diffusers")
    for m, delta, a, b in zip(FULL, _deltas(ours), A, B):
        ka, kb, _ = st.keys(m)
        torch.testing.assert_close(theirs[kb] @ theirs[ka], delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(delta, b @ a, rtol=1e-5, atol=1e-6)  # alpha / rank * (B / (alpha / rank)) A


# --------------------------------------------------------------------------- DiffSynth

@pytest.mark.parametrize("style", ["export", "comfy"])
def test_diffsynth_fuses_like_lofa_applies(tmp_path, dit, style):
    """DiffSynth's GeneralLoRALoader fuses lofa's export file (and a ComfyUI-style file with alpha,
    which it reads as alpha / rank) into the DiT; its output is lofa's apply_lora output."""
    from diffsynth.utils.lora import GeneralLoRALoader

    A, B = _factors(VOCAB, seed=1)
    if style == "export":
        path = tmp_path / "export.safetensors"
        save_lora(path, A, B, VOCAB, META, scale=0.5)
    else:
        path = _write_style(tmp_path / "comfy.safetensors", VOCAB, A, B, "comfy", alpha=2.0)
    fused = copy.deepcopy(dit)
    with pytest.warns(UserWarning, match="Alpha") if style == "comfy" else contextlib.nullcontext():
        GeneralLoRALoader().fuse_lora_to_base_model(fused, load_tensors(path), alpha=1.0)
    weights = zip(VOCAB, base_weights(fused, VOCAB), base_weights(dit, VOCAB))
    assert [m for m, w, w0 in weights if not torch.equal(w, w0)] == list(VOCAB)  # all 16, none else checked below
    x, t, c = _inputs()
    with torch.no_grad():
        want = dit_forward(fused, x, t, c)
        got = dit_forward(copy.deepcopy(dit), x, t, c, lora=load_lora(path, VOCAB).to_weights())
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------- diffusers

def _diffusers_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(num_attention_heads=CFG.num_heads, attention_head_dim=CFG.dim // CFG.num_heads,
                                  in_channels=16, out_channels=16, text_dim=CFG.text_dim, ffn_dim=CFG.ffn_dim,
                                  num_layers=CFG.num_layers)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=model)


def _diffusers_forward(model) -> torch.Tensor:
    x, t, c = _inputs()
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False)[0]


def _diffusers_module(m) -> str:
    """diffusers' WanTransformer3DModel name of vocabulary matrix ``m`` (``blocks.0.attn1.to_q``)."""
    return formats.style("diffusers").module_name(m.block, m.module).removeprefix("transformer.")


def _with_deltas(model, vocab: Vocabulary, deltas):
    """A copy of the diffusers model with lofa's dW = B A added to each matrix's weight."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m, d in zip(vocab, deltas):
            out.get_submodule(_diffusers_module(m)).weight += d
    return out


def test_diffusers_load_lora_weights_changes_the_output_as_lofa_does(tmp_path):
    """WanPipeline.load_lora_weights on lofa's export file: PEFT's output equals the base model with
    lofa's dW added, and fusing changes exactly the 16 adapted weights by lofa's dW."""
    A, B = _factors(VOCAB, seed=2)
    path = tmp_path / "lora.safetensors"
    save_lora(path, A, B, VOCAB, META, scale=0.7)
    deltas = _deltas(load_lora(path, VOCAB))
    pipe = _diffusers_pipe()
    base = copy.deepcopy(pipe.transformer)
    want = _diffusers_forward(_with_deltas(base, VOCAB, deltas))
    assert (want - _diffusers_forward(base)).abs().mean() > 1e-3
    pipe.load_lora_weights(str(path), adapter_name="lofa")
    torch.testing.assert_close(_diffusers_forward(pipe.transformer), want, rtol=RTOL, atol=ATOL)
    pipe.transformer.fuse_lora()
    pipe.transformer.unload_lora()
    before, after = base.state_dict(), pipe.transformer.state_dict()
    assert set(before) == set(after)
    adapted = {_diffusers_module(m) + ".weight": d for m, d in zip(VOCAB, deltas)}
    for k in before:
        if k in adapted:
            torch.testing.assert_close(after[k] - before[k], adapted[k], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(after[k], before[k]), k


def test_diffusers_saved_file_and_its_adapter_alpha_load_in_lofa(tmp_path):
    """A file diffusers itself wrote (save_lora_weights, with its lora_adapter_metadata) and a diffusers
    file whose header sets lora_alpha != r load in lofa with the dW diffusers applies."""
    from peft.utils import get_peft_model_state_dict

    A, B = _factors(VOCAB, seed=4)
    path = tmp_path / "lora.safetensors"
    save_lora(path, A, B, VOCAB, META)
    pipe = _diffusers_pipe()
    pipe.load_lora_weights(str(path), adapter_name="lofa")
    config = pipe.transformer.peft_config["lofa"].to_dict()
    pipe.save_lora_weights(tmp_path / "saved", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer,
                                                                                                  adapter_name="lofa"),
                           transformer_lora_adapter_metadata=config)
    saved = tmp_path / "saved" / "pytorch_lora_weights.safetensors"
    assert "lora_adapter_metadata" in read_metadata(saved)
    got = load_lora(saved, VOCAB)
    assert got.key_format == "diffusers"
    for d, a, b in zip(_deltas(got), A, B):
        torch.testing.assert_close(d, b @ a, rtol=1e-5, atol=1e-7)
    header = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": 3 * RANK,
                                                   "transformer.target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})}
    scaled = _write_style(tmp_path / "alpha.safetensors", VOCAB, A, B, "diffusers", metadata=header)
    ours = _deltas(load_lora(scaled, VOCAB))
    pipe = _diffusers_pipe()
    base = copy.deepcopy(pipe.transformer)
    pipe.load_lora_weights(str(scaled), adapter_name="a")
    want = _diffusers_forward(_with_deltas(base, VOCAB, ours))
    torch.testing.assert_close(_diffusers_forward(pipe.transformer), want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[0], 3 * B[0] @ A[0], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- ComfyUI's mapping rules, as data

# Read from Comfy-Org/ComfyUI: comfy/lora.py @ 17358c8f73b581a0d22facc3c385822f09b8bfb1 (model_lora_keys_unet:
# every model weight "diffusion_model.X.weight" is the target of LoRA names "lora_unet_" + X with "." -> "_"
# and "diffusion_model.X"; Wan has no model-specific branch; load_lora reads "{name}.alpha"),
# comfy/weight_adapter/lora.py @ 6f98b150e065f1ffc788558574a887835068bd40 (LoRAAdapter.load: the up/down
# suffix pairs below, tried in this order; calculate_weight: W += strength * alpha / rank * up @ down, alpha
# absent -> 1), comfy/lora_convert.py @ 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5 (convert_lora leaves these
# keys as they are). comfy/ldm/wan/model.py @ 0c9a69aefdb1fcf6b9c60478aa9e511b01f8e96f names the DiT's
# modules as Wan (and diffsynth's WanModel, lofa's DiT) do: blocks.N.self_attn.q ... ffn.0, ffn.2.
COMFY_NAME_RULES = (("lora_unet_", True), ("diffusion_model.", False))  # (prefix, dots -> underscores)
COMFY_UP_DOWN = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                 (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                 (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                 (".lora_B.default.weight", ".lora_A.default.weight"))


def _comfy_key_map(model_keys) -> dict[str, str]:
    out = {}
    for k in model_keys:
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            name = k[len("diffusion_model."):-len(".weight")]
            for prefix, underscores in COMFY_NAME_RULES:
                out[prefix + (name.replace(".", "_") if underscores else name)] = k
    return out


def _comfy_patches(lora: dict[str, torch.Tensor], key_map: dict[str, str]):
    """ComfyUI's load_lora on ``lora``: {model weight: alpha / rank * up @ down}, and the keys it did not load."""
    patches, loaded = {}, set()
    for name, target in key_map.items():
        for up, down in COMFY_UP_DOWN:
            if name + up in lora:
                alpha = lora.get(name + ".alpha")
                rank = lora[name + down].shape[0]
                scale = 1.0 if alpha is None else float(alpha) / rank
                patches[target] = scale * lora[name + up].float() @ lora[name + down].float()
                loaded |= {name + up, name + down} | ({name + ".alpha"} if alpha is not None else set())
                break
    return patches, set(lora) - loaded


@pytest.mark.parametrize("style", ["export", "kohya", "comfy"])
def test_every_key_lofa_writes_maps_to_a_wan_weight_under_comfyui_rules(tmp_path, dit, style):
    model = {f"diffusion_model.{k}": v for k, v in dit.state_dict().items()}
    key_map = _comfy_key_map(model)
    A, B = _factors(VOCAB, seed=6)
    if style == "export":
        path = tmp_path / "lora.safetensors"
        save_lora(path, A, B, VOCAB, META, scale=1.5)
    else:
        path = _write_style(tmp_path / f"{style}.safetensors", VOCAB, A, B, style, alpha=2.0)
    patches, not_loaded = _comfy_patches(load_tensors(path), key_map)
    assert not_loaded == set()  # ComfyUI would log "lora key not loaded" for any
    want = {f"diffusion_model.{m.base_key}": d for m, d in zip(VOCAB, _deltas(load_lora(path, VOCAB)))}
    assert set(patches) == set(want)
    for k, d in patches.items():
        assert d.shape == model[k].shape
        torch.testing.assert_close(d, want[k], rtol=1e-5, atol=1e-7)


def test_real_wan_scale_keys_map_under_comfyui_and_name_the_base():
    """At Wan2.1-1.3B's shapes (30 blocks, dim 1536; no tensors built) every export key has a ComfyUI target."""
    vocab = Vocabulary.from_dims(1536, 8960, 30)
    model = {f"diffusion_model.{m.base_key}" for m in Vocabulary.from_dims(1536, 8960, 30, ALL_MODULES)}
    key_map = _comfy_key_map(model)
    names = {k.rsplit(".lora_", 1)[0] for k in vocab.lora_keys("export")}
    assert len(names) == 240 and names <= set(key_map)
    assert formats.base_model_id(vocab) == "Wan-AI/Wan2.1-T2V-1.3B" and formats.base_model_id(VOCAB) is None


# --------------------------------------------------------------------------- metadata and model cards

def test_header_carries_modelspec_and_network_dim_without_a_date_when_fitted(tmp_path):
    A, B = _factors(VOCAB)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for p in (one, two):
        save_lora(p, A, B, VOCAB, {**META, "clip_id": "synth/wave/000001"}, title="fitted: synth/wave/000001")
    assert sha256_file(one) == sha256_file(two)  # a fitted file is the same bytes on a rerun
    meta = read_metadata(one)
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.architecture"] == "wan2.1/lora"
    assert meta["modelspec.title"] == "fitted: synth/wave/000001"
    assert META["prompt"] in meta["modelspec.description"]
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == RANK  # alpha / rank = 1
    assert "modelspec.date" not in meta and not formats.card_path(one).exists()
    dated = tmp_path / "dated.safetensors"
    save_lora(dated, A, B, VOCAB, META, date=datetime(2026, 12, 6, 5, 0, 1, 999, tzinfo=timezone.utc), card="by hand")
    assert read_metadata(dated)["modelspec.date"] == "2026-12-06T05:00:01+00:00"


def test_model_card_beside_the_file_has_front_matter_and_how_it_was_made(tmp_path):
    A, B = _factors(VOCAB)
    path = tmp_path / "wave.safetensors"
    save_lora(path, A, B, VOCAB, META, card="predicted by the LoFA hypernetwork `h1`")
    text = formats.card_path(path).read_text()
    assert formats.card_path(path) == tmp_path / "wave.md"
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["base_model_hash"] == "abc123" and front["instance_prompt"] == META["prompt"]
    assert front["rank"] == RANK and front["producer"] == f"lofa {lofa.__version__}" and front["license"]
    assert "base_model" not in front  # the synthetic DiT has no hub id
    assert "predicted by the LoFA hypernetwork `h1`" in text and "Prompt**: a small red figure waves" in text
    real = formats.lora_card({**read_metadata(path), "rank": "4"}, Vocabulary.from_dims(1536, 8960, 30), "x")
    assert yaml.safe_load(real.split("---\n")[1])["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B"
    card = formats.hypernet_card("lofa-hypernet", "abc123", {"stage2": {"config": {"rank": 4}, "weights_hash": "w2"}})
    assert yaml.safe_load(card.split("---\n")[1])["base_model_hash"] == "abc123" and "`w2`" in card


def test_predicted_file_is_dated_with_a_card_and_refine_reads_its_musubi_twin(tmp_path):
    """Predictor.save dates the file and writes its card; ``refine`` (through load_user_lora) starts from
    a kohya/musubi-tuner copy of that file exactly as from the file itself, and the refined file has
    its own card and no date."""
    from lofa.serving.predict import Predictor
    from lofa.refine import refine_files
    from tiny_artifacts import write_artifacts, write_clip

    art = write_artifacts(tmp_path / "art")
    predictor = Predictor.from_dirs(art["base"], art["stage1"], art["stage2"], art["params"])
    pred = predictor.predict("a small red figure waves quickly")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    path = predictor.save(pred, tmp_path / "pred.safetensors")
    meta = read_metadata(path)
    assert before <= datetime.fromisoformat(meta["modelspec.date"]) <= datetime.now(timezone.utc)
    assert predictor.hypernet_hash in formats.card_path(path).read_text()
    twin = _write_style(tmp_path / "musubi.safetensors", pred.vocab, pred.A, pred.B, "kohya", alpha=float(pred.rank))
    clip = write_clip(tmp_path / "clip.safetensors")
    refined = {}
    for name, start in (("export", path), ("kohya", twin)):
        out = tmp_path / f"refined_{name}.safetensors"
        refine_files(start, clip, steps=2, base_dir=art["base"], params_path=art["params"], output=out)
        refined[name] = load_lora(out, pred.vocab)
        assert "modelspec.date" not in refined[name].metadata
        assert f"refined from `{start}` by 2 flow-matching steps" in formats.card_path(out).read_text()
    for a, b in zip(refined["kohya"].A + refined["kohya"].B, refined["export"].A + refined["export"].B):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # alpha = rank: the same start, bit for bit


# --------------------------------------------------------------------------- bad files

def _bad_cases(A, B):
    st = formats.style("kohya")
    good = {}
    for m, a, b in zip(VOCAB, A, B):
        ka, kb, kalpha = st.keys(m)
        good |= {ka: a, kb: b, kalpha: torch.tensor(4.0)}
    q = "lora_unet_blocks_1_cross_attn_v"
    return [
        ({**good, f"{q}.lora_up.weight": torch.zeros(CFG.dim, RANK + 1)},
         f"'{q}.lora_up.weight' has shape \\(96, 5\\), expected \\(96, 4\\)"),
        ({k: v for k, v in good.items() if k != f"{q}.lora_up.weight"}, f"missing key '{q}.lora_up.weight'"),
        ({k: v for k, v in good.items() if k != f"{q}.lora_down.weight"}, f"missing key '{q}.lora_down.weight'"),
        ({**good, f"{q}.lora_down.weight": A[0].clone().fill_(float("nan"))}, f"'{q}.lora_down.weight' contains NaN"),
        ({**good, f"{q}.alpha": torch.tensor([4.0, 4.0])}, f"'{q}.alpha' has shape \\(2,\\), expected a scalar"),
        ({**good, f"{q}.alpha": torch.tensor(float("inf"))}, f"'{q}.alpha' is inf"),
        ({**good, "lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": A[0].clone()},
         "unexpected key 'lora_unet_blocks_0_cross_attn_k_img.lora_down.weight'.*not a LoRA key lofa reads"),
    ]


def test_bad_files_fail_naming_the_file_and_the_key(tmp_path):
    A, B = _factors(VOCAB)
    for i, (tensors, pattern) in enumerate(_bad_cases(A, B)):
        path = tmp_path / f"bad{i}.safetensors"
        save_tensors(path, tensors)
        with pytest.raises(LoRAFormatError, match=f"{re.escape(str(path))}: {pattern}"):
            load_lora(path, VOCAB)
    header = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": RANK, "alpha_pattern": {"to_q": 1}})}
    path = _write_style(tmp_path / "pattern.safetensors", VOCAB, A, B, "diffusers", metadata=header)
    pattern = f"{re.escape(str(path))}: header 'lora_adapter_metadata' sets 'alpha_pattern'"
    with pytest.raises(LoRAFormatError, match=pattern):
        load_lora(path, VOCAB)
    path = _write_style(tmp_path / "none.safetensors", VOCAB, A, B, "export")
    with pytest.raises(LoRAFormatError, match="no LoRA key of the formats"):
        load_lora(path, Vocabulary.from_dims(96, 128, 2, ["ffn.0"]))
