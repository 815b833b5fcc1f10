"""Checkpoint writing and loading: both layouts, shards, config parsing, and clear errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import PRESETS, write_checkpoint
from engine.loader import CheckpointError, load_model
from engine.model_config import ModelConfig, load_model_config
from engine.tokenizer import Tokenizer
from engine.weight_names import hf_tensor_shapes, permute_hf_to_mistral, permute_mistral_to_hf


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = write_checkpoint(tmp_path / "a", PRESETS["tiny"], seed=3)
    b = write_checkpoint(tmp_path / "b", PRESETS["tiny"], seed=3)
    c = write_checkpoint(tmp_path / "c", PRESETS["tiny"], seed=4)
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_layouts_and_shards_load_the_same_weights(tmp_path: Path, make_checkpoint) -> None:
    single, _ = load_model(make_checkpoint(), torch.float32, progress=False)
    sharded_dir = make_checkpoint(shard_mb=2)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 2
    mistral_dir = make_checkpoint(layout="mistral")
    assert {p.name for p in mistral_dir.iterdir()} == {"consolidated.safetensors", "params.json", "tokenizer.model.v1"}
    for other_dir in (sharded_dir, mistral_dir):
        other, _ = load_model(other_dir, torch.float32, progress=False)
        for (name, a), (_, b) in zip(single.named_parameters(), other.named_parameters()):
            assert torch.equal(a, b), f"{other_dir.name}: {name} differs"


def test_rotary_permutation_round_trips_and_reorders() -> None:
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).view(4 * 8, 3)  # 4 heads, head_dim 8
    assert torch.equal(permute_mistral_to_hf(permute_hf_to_mistral(w, 4), 4), w)
    mistral = permute_hf_to_mistral(w, 4)
    # Hugging Face rows 0 and 4 (first element of each half) become Mistral's interleaved pair 0, 1.
    assert torch.equal(mistral[0], w[0]) and torch.equal(mistral[1], w[4])


def test_load_casts_dtype_and_matches_file(make_checkpoint) -> None:
    ckpt = make_checkpoint(dtype="bfloat16")
    model, cfg = load_model(ckpt, torch.float32, progress=False)
    raw = load_file(str(ckpt / "model.safetensors"))
    assert model.embed.dtype == torch.float32
    assert torch.equal(model.embed, raw["model.embed_tokens.weight"].float())
    i = cfg.intermediate_size
    w13 = model.layers[1].moe.w13[5]
    assert torch.equal(w13[:i], raw["model.layers.1.block_sparse_moe.experts.5.w1.weight"].float())
    assert torch.equal(w13[i:], raw["model.layers.1.block_sparse_moe.experts.5.w3.weight"].float())
    assert w13.stride()[-1] == 1 and model.layers[1].moe.w2.shape == (cfg.num_local_experts, cfg.hidden_size, i)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(tmp_path: Path, make_checkpoint) -> None:
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*experts\.3\.w2\.weight \[128, 256\]"):
        load_model(ckpt, torch.float32, progress=False)


def test_wrong_shape_is_named(tmp_path: Path, make_checkpoint) -> None:
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(128, 64)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*model\.safetensors.*\[128, 64\], expected \[128, 128\]"):
        load_model(ckpt, torch.float32, progress=False)


def test_unexpected_tensor_is_named(tmp_path: Path, make_checkpoint) -> None:
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.9.mlp.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.weight'"):
        load_model(ckpt, torch.float32, progress=False)


def test_unknown_format_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="expected config.json .* or params.json"):
        load_model_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_config(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_model_config(tmp_path)


def test_missing_weights_and_tokenizer(tmp_path: Path, make_checkpoint) -> None:
    ckpt = _copy(make_checkpoint(), tmp_path / "c")
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(ckpt, torch.float32, progress=False)


@pytest.mark.parametrize(
    ("window", "expected"),
    [(4096, 4096), ([4096, 4096], 4096), ("4096", 4096), ("null", None), (None, None), ("absent", None)],
)
def test_params_json_variants(window: object, expected: int | None) -> None:
    params = PRESETS["tiny"].to_mistral()
    params.pop("rope_theta")
    if window == "absent":
        params.pop("sliding_window")
    else:
        params["sliding_window"] = window
    cfg = ModelConfig.from_mistral(params)
    assert cfg.sliding_window == expected
    assert cfg.rope_theta == 1e6  # Mistral's default when params.json omits it


def test_params_json_rejects_mixed_windows_and_non_moe() -> None:
    params = PRESETS["tiny"].to_mistral()
    with pytest.raises(ValueError, match="per-layer windows"):
        ModelConfig.from_mistral(params | {"sliding_window": [4096, None]})
    with pytest.raises(ValueError, match="no 'moe' section"):
        ModelConfig.from_mistral({k: v for k, v in params.items() if k != "moe"})


def test_hf_config_round_trip_and_shapes() -> None:
    cfg = PRESETS["bench"]
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert ModelConfig.from_mistral(cfg.to_mistral()) == cfg
    params = sum(torch.Size(s).numel() for s in hf_tensor_shapes(cfg).values())
    assert 0.7e9 < params < 0.9e9  # the ~0.8 B "bench" model
