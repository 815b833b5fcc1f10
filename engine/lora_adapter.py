"""LoRA adapters on disk, in PEFT's layout or mistral-finetune's, read into one form; random ones written.

PEFT: `adapter_config.json` (`r`, `lora_alpha`, `use_rslora`, `target_modules`) and
`adapter_model.safetensors` with Hugging Face names
(`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`,
`...block_sparse_moe.experts.J.w1.lora_B.weight`). mistral-finetune: `params.json` with
`lora: {rank, scaling}` and `lora.safetensors` with Mistral names (`layers.N.attention.wq.lora_A.weight`,
`layers.N.feed_forward.experts.J.w1.lora_B.weight`), q/k rows in Mistral's rotary order.
Either way the result is per module A [r, in] and B [out, r] with the scaling folded into B,
in Hugging Face row order, the engine's.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.model_config import ModelConfig, load_model_config
from engine.weight_names import permute_hf_to_mistral, permute_mistral_to_hf

AdapterLayout = Literal["peft", "mistral"]
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("w1", "w2", "w3")
TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS
_MISTRAL_ATTENTION = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_PEFT_NAME = re.compile(
    r"base_model\.model\.model\.layers\.(?P<L>\d+)\."
    r"(?:self_attn\.(?P<attn>\w+)|block_sparse_moe\.experts\.(?P<E>\d+)\.(?P<expert>\w+))"
    r"\.lora_(?P<AB>[AB])\.weight\Z"
)
_MISTRAL_NAME = re.compile(
    r"layers\.(?P<L>\d+)\.(?:attention\.(?P<attn>\w+)|feed_forward\.experts\.(?P<E>\d+)\.(?P<expert>\w+))"
    r"\.lora_(?P<AB>[AB])\.weight\Z"
)
ModuleKey = tuple[int, str, int | None]  # (layer, target, expert or None)


class AdapterError(ValueError):
    """An adapter this engine cannot serve on this base model; the message names the problem."""


@dataclass
class LoRAAdapter:
    rank: int  # the largest rank of its modules
    # (layer, target, expert) -> (A [r, in], B [out, r] * scaling), fp32, Hugging Face row order
    weights: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]

    @property
    def targets(self) -> set[str]:
        return {target for _, target, _ in self.weights}


def module_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(out, in) features of a target module's base weight."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (cfg.q_size, d), "k_proj": (cfg.kv_size, d), "v_proj": (cfg.kv_size, d),
            "o_proj": (d, cfg.q_size), "w1": (i, d), "w3": (i, d), "w2": (d, i)}[target]


def _rotary_heads(cfg: ModelConfig, target: str) -> int | None:
    return {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(target)


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the file's header alone."""
    if not file.is_file():
        raise AdapterError(f"{file.parent}: missing {file.name}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file}: not a readable safetensors file ({err})") from None


def _peft_scaling(config: dict) -> float:
    """PEFT's scaling of B @ A (alpha / r, or alpha / sqrt(r) with rsLoRA); rejects what we do not serve."""
    unsupported = {k: config.get(k) for k in ("rank_pattern", "alpha_pattern", "modules_to_save", "use_dora")}
    for key, value in unsupported.items():
        if value:
            raise AdapterError(f"adapter_config.json: {key}={value!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter_config.json: bias={config['bias']!r} is not supported (LoRA without biases only)")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = config.get("target_modules") or []
    for target in [] if isinstance(targets, str) else targets:  # a string is a regex: the tensors tell
        if target not in TARGETS:
            raise AdapterError(f"adapter_config.json targets {target!r}, which is not served: LoRA is served on "
                               f"{', '.join(TARGETS)}")
    return scaling


def _parse(
    shapes: dict[str, tuple[int, ...]], pattern: re.Pattern[str], rename: dict[str, str], file: Path
) -> dict[ModuleKey, dict[str, str]]:
    """(layer, target, expert) -> {"A": tensor name, "B": tensor name}."""
    modules: dict[ModuleKey, dict[str, str]] = {}
    for name in shapes:
        match = pattern.match(name)
        target = None
        if match:
            target = rename.get(match["attn"], match["attn"]) if match["attn"] else match["expert"]
        if match is None or target not in TARGETS:
            raise AdapterError(f"{file.name}: tensor {name!r} is not a LoRA weight of a served module "
                               f"({', '.join(TARGETS)}; embeddings, LM head, router gate and norms are not served)")
        expert = int(match["E"]) if match["E"] is not None else None
        modules.setdefault((int(match["L"]), target, expert), {})[match["AB"]] = name
    return modules


def declared_rank(path: str | Path) -> int | None:
    """The rank an adapter folder's config declares (None when it declares none)."""
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return int(json.loads((folder / "adapter_config.json").read_text())["r"])
    if (folder / "params.json").is_file():
        rank = (json.loads((folder / "params.json").read_text()).get("lora") or {}).get("rank")
        return None if rank is None else int(rank)
    return None


@dataclass
class _Layout:
    file: Path
    scaling: float
    mistral: bool  # q/k rows in Mistral's rotary order
    modules: dict[ModuleKey, dict[str, str]]
    rank: int


def check_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> _Layout:
    """Checks the adapter in folder `path` against base model `cfg` and the rank limit from its
    config and tensor headers alone (no weights read); raises AdapterError naming the problem."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if (folder / "adapter_config.json").is_file():
        scaling = _peft_scaling(json.loads((folder / "adapter_config.json").read_text()))
        file, pattern, rename, mistral = folder / "adapter_model.safetensors", _PEFT_NAME, {}, False
    elif (folder / "params.json").is_file() and (folder / "lora.safetensors").is_file():
        lora = json.loads((folder / "params.json").read_text()).get("lora") or {}
        scaling = float(lora.get("scaling", 2.0))  # mistral-finetune's default
        file, pattern, rename, mistral = folder / "lora.safetensors", _MISTRAL_NAME, _MISTRAL_ATTENTION, True
    else:
        raise AdapterError(f"{folder} holds neither adapter_config.json + adapter_model.safetensors (PEFT) nor "
                           "params.json + lora.safetensors (mistral-finetune)")
    shapes = _shapes(file)
    modules = _parse(shapes, pattern, rename, file)
    if not modules:
        raise AdapterError(f"{file.name} holds no LoRA weights")
    rank = 0
    for (layer, target, expert), pair in modules.items():
        where = f"layer {layer} {target}" + ("" if expert is None else f" of expert {expert}")
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{file.name}: {where} has lora_{''.join(pair)} without its partner")
        if layer >= cfg.num_hidden_layers or (expert is not None and expert >= cfg.num_local_experts):
            raise AdapterError(f"{file.name}: {where} does not exist in the base model "
                               f"({cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts)")
        a, b = shapes[pair["A"]], shapes[pair["B"]]
        out_f, in_f = module_shape(cfg, target)
        r = a[0] if a else 0
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b != (out_f, r):
            raise AdapterError(f"{file.name}: {where} has lora_A {a} and lora_B {b}; "
                               f"this base model needs [r, {in_f}] and [{out_f}, r]")
        if r > max_rank:
            raise AdapterError(f"{file.name}: {where} has rank {r}, above max_lora_rank {max_rank}")
        rank = max(rank, r)
    return _Layout(file, scaling, mistral, modules, rank)


def read_adapter(path: str | Path, cfg: ModelConfig, max_rank: int) -> LoRAAdapter:
    """The adapter in folder `path`, checked (`check_adapter`), its weights read."""
    layout = check_adapter(path, cfg, max_rank)
    weights: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(str(layout.file), framework="pt") as handle:
        for (layer, target, expert), pair in layout.modules.items():
            a, b = handle.get_tensor(pair["A"]).float(), handle.get_tensor(pair["B"]).float()
            heads = _rotary_heads(cfg, target)
            if layout.mistral and heads is not None:
                b = permute_mistral_to_hf(b, heads)
            weights[(layer, target, expert)] = (a.contiguous(), (b * layout.scaling).contiguous())
    return LoRAAdapter(layout.rank, weights)


def write_random_adapter(
    model_dir: str | Path,
    out: str | Path,
    rank: int = 8,
    targets: tuple[str, ...] = TARGETS,
    layout: AdapterLayout = "peft",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A random adapter for the checkpoint in `model_dir` (tests, demos, benchmarks): A and B both
    non-zero (a freshly initialised adapter's zero B would change nothing), scaling 2."""
    cfg, _ = load_model_config(Path(model_dir))
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"targets {unknown} are not served; choose from {', '.join(TARGETS)}")
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(cfg.num_hidden_layers):
        for target in [t for t in TARGETS if t in targets]:
            out_f, in_f = module_shape(cfg, target)
            experts = range(cfg.num_local_experts) if target in EXPERT_TARGETS else [None]
            for expert in experts:
                a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)  # [r, in]
                # Scaled so W + 2 B A moves W by about a quarter of its own size.
                b = torch.randn(out_f, rank, generator=gen) / (8 * math.sqrt(rank * in_f / out_f + rank))  # [out, r]
                if layout == "mistral" and (heads := _rotary_heads(cfg, target)) is not None:
                    b = permute_hf_to_mistral(b, heads)
                if layout == "mistral":
                    module = (f"layers.{layer}.attention.w{target[0]}" if expert is None
                              else f"layers.{layer}.feed_forward.experts.{expert}.{target}")
                else:
                    module = (f"base_model.model.model.layers.{layer}.self_attn.{target}" if expert is None
                              else f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{expert}.{target}")
                tensors[f"{module}.lora_A.weight"] = a.to(dtype).contiguous()
                tensors[f"{module}.lora_B.weight"] = b.to(dtype).contiguous()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "mistral":
        save_file(tensors, str(folder / "lora.safetensors"))
        params = cfg.to_mistral() | {"lora": {"enable": True, "rank": rank, "dropout": 0.0, "scaling": 2.0}}
        (folder / "params.json").write_text(json.dumps(params, indent=2))
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                  "use_rslora": False, "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
                  "base_model_name_or_path": str(model_dir), "modules_to_save": None}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
