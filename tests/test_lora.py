"""LoRA adapters per request against an oracle: transformers on a checkpoint with the adapter merged
into its weights (W + scaling * B @ A), merged here straight from the adapter's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MixtralForCausalLM

from engine import LLM, LoRARequest, SamplingParams
from engine.checkpoint import PRESETS
from engine.lora_adapter import write_random_adapter
from engine.outputs import RequestError, StepFailedError

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 415, 5565, 302, 4843, 349], [1, 22557, 28725, 586], [1] + list(range(300, 341))]
ADAPTERS = {  # name -> (targets, rank, layout)
    "both": (("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"), 8, "peft"),
    "attention": (("q_proj", "k_proj", "v_proj", "o_proj"), 4, "peft"),
    "experts": (("w1", "w2", "w3"), 8, "peft"),
    "mistral": (("q_proj", "k_proj", "o_proj", "w1", "w2"), 6, "mistral"),
}


@pytest.fixture(scope="module")
def base(make_checkpoint) -> Path:
    return make_checkpoint()


@pytest.fixture(scope="module")
def adapters(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoRARequest]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: LoRARequest(name, str(write_random_adapter(base, root / name, rank, targets, layout, seed=i + 1)))
            for i, (name, (targets, rank, layout)) in enumerate(ADAPTERS.items())}


def merged_hf(base: Path, adapter: Path, out: Path) -> Path:
    """A Hugging Face checkpoint with a PEFT or mistral-finetune adapter merged in, from the files alone."""
    shutil.copytree(base, out)
    weights = load_file(str(base / "model.safetensors"))
    if (adapter / "adapter_config.json").is_file():
        config = json.loads((adapter / "adapter_config.json").read_text())
        scaling, lora = config["lora_alpha"] / config["r"], load_file(str(adapter / "adapter_model.safetensors"))
        rename = lambda name: name.removeprefix("base_model.model.")  # noqa: E731
    else:
        scaling = json.loads((adapter / "params.json").read_text())["lora"]["scaling"]
        lora = load_file(str(adapter / "lora.safetensors"))
        # Mistral names onto Hugging Face ones; q/k rows from Mistral's rotary order to HF's.
        heads = {"wq": PRESETS["tiny"].num_attention_heads, "wk": PRESETS["tiny"].num_key_value_heads}
        table = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}

        def rename(name: str) -> str:
            name = name.replace("attention.", "self_attn.").replace("feed_forward.", "block_sparse_moe.")
            for old, new in table.items():
                name = name.replace(f".{old}.", f".{new}.")
            return "model." + name

        for name in [n for n in lora if n.endswith("lora_B.weight") and any(f".{h}." in n for h in heads)]:
            n_heads = heads[next(h for h in heads if f".{h}." in name)]
            b = lora[name]
            rows, cols = b.shape
            lora[name] = b.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    for name in [n for n in lora if n.endswith("lora_A.weight")]:
        a, b = lora[name].double(), lora[name.replace("lora_A", "lora_B")].double()
        target = rename(name.replace(".lora_A.weight", ".weight"))
        weights[target] = (weights[target].double() + scaling * b @ a).to(weights[target].dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def oracle_tokens(ckpt: Path) -> list[list[int]]:
    hf = MixtralForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    out = []
    for prompt in PROMPTS:
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                              min_new_tokens=GREEDY.max_tokens, pad_token_id=0)
        out.append(ids[0, len(prompt):].tolist())
    return out


def engine(base: Path, max_loras: int = 4, **kwargs: object) -> LLM:
    return LLM(base, dtype="float32", cache={"kv_cache_bytes": 8 * 2**20, "block_size": 8}, load_progress=False,
               lora={"max_loras": max_loras, "max_lora_rank": 8}, **kwargs)


@pytest.fixture(scope="module")
def expected(base: Path, adapters: dict[str, LoRARequest], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str | None, list[list[int]]]:
    """Greedy tokens per adapter (None: the base model), from transformers on merged checkpoints."""
    root = tmp_path_factory.mktemp("merged")
    tokens: dict[str | None, list[list[int]]] = {None: oracle_tokens(base)}
    for name, request in adapters.items():
        tokens[name] = oracle_tokens(merged_hf(base, Path(request.path), root / name))
    return tokens


def test_each_adapter_alone_matches_the_merged_model(base, adapters, expected) -> None:
    llm = engine(base)
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY)] == expected[None]
    for name, request in adapters.items():
        got = [r.token_ids for r in llm.generate(PROMPTS, GREEDY, lora_request=request)]
        assert got == expected[name], f"adapter {name}"
        assert got != expected[None], f"adapter {name} changed nothing"


def test_one_step_mixes_the_base_model_and_four_adapters(base, adapters, expected) -> None:
    llm = engine(base)
    names: list[str | None] = [None, *adapters]
    prompts = [p for p in PROMPTS for _ in names]
    loras = [None if n is None else adapters[n] for _ in PROMPTS for n in names]
    steps: list[set[int]] = []
    execute = llm.engine.runner.execute

    def spy(batch, *args):  # records the slots each step ran
        steps.append({s.seq.lora_slot for s in batch})
        return execute(batch, *args)

    llm.engine.runner.execute = spy
    results = llm.generate(prompts, GREEDY, lora_request=loras)
    for i, result in enumerate(results):
        prompt, name = divmod(i, len(names))
        assert result.token_ids == expected[names[name]][prompt], f"prompt {prompt}, adapter {names[name]}"
    assert max(len(s) for s in steps) == 5  # base (-1) and four slots in one step


def test_more_adapters_than_slots_evict_and_reload(base, adapters, expected) -> None:
    llm = engine(base, max_loras=2)
    names = list(adapters)
    results = llm.generate(PROMPTS * len(names), GREEDY, lora_request=[adapters[n] for n in names for _ in PROMPTS])
    for i, result in enumerate(results):
        name, prompt = divmod(i, len(PROMPTS))
        assert result.token_ids == expected[names[name]][prompt], f"adapter {names[name]}"
    slots = llm.engine.lora_slots
    assert slots is not None and slots.loads_total >= 4 and not any(slots.users.values())
    # Back to the first adapter, evicted by now: reloaded, same tokens.
    again = llm.generate(PROMPTS, GREEDY, lora_request=adapters[names[0]])
    assert [r.token_ids for r in again] == expected[names[0]]
    assert llm.engine.blocks.num_used_blocks == 0


def test_prefix_cache_is_never_shared_across_adapters(base, adapters) -> None:
    llm = engine(base)
    prompt = [PROMPTS[2]]
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens == 0
    assert llm.generate(prompt, GREEDY)[0].num_cached_tokens > 0  # the base model's own blocks
    first = llm.generate(prompt, GREEDY, lora_request=adapters["attention"])[0]
    assert first.num_cached_tokens == 0  # not the base model's blocks
    assert llm.generate(prompt, GREEDY, lora_request=adapters["attention"])[0].num_cached_tokens > 0
    assert llm.generate(prompt, GREEDY, lora_request=adapters["both"])[0].num_cached_tokens == 0
    moved = LoRARequest("attention", adapters["both"].path)  # the same name, other weights
    assert llm.generate(prompt, GREEDY, lora_request=moved)[0].num_cached_tokens == 0


def test_bad_adapters_are_errors_that_name_the_problem(base, adapters, tmp_path: Path, make_checkpoint) -> None:
    llm = engine(base)
    bench_like = make_checkpoint(PRESETS["tiny"].model_copy(update={"hidden_size": 64}))
    wrong = write_random_adapter(bench_like, tmp_path / "wrong", rank=4)
    big = write_random_adapter(base, tmp_path / "big", rank=16)
    gate = write_random_adapter(base, tmp_path / "gate", rank=4, targets=("q_proj",))
    tensors = load_file(str(gate / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.block_sparse_moe.gate.lora_A.weight"] = torch.zeros(4, 128)
    save_file(tensors, str(gate / "adapter_model.safetensors"))
    embed = write_random_adapter(base, tmp_path / "embed", rank=4, targets=("q_proj",))
    config = json.loads((embed / "adapter_config.json").read_text())
    (embed / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["q_proj", "embed_tokens"]}))
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(wrong): "needs [r, 128]",
        str(big): "rank 16, above max_lora_rank 8",
        str(gate): "block_sparse_moe.gate",
        str(embed): "'embed_tokens', which is not served",
    }
    for path, message in cases.items():
        with pytest.raises(RequestError, match=message.replace("[", r"\[")):
            llm.generate(PROMPTS, GREEDY, lora_request=[None, LoRARequest("bad", path), None])
    assert not llm.engine.has_unfinished and llm.engine.blocks.num_used_blocks == 0
    # Nothing else was affected: the engine serves base and adapter requests as before.
    assert llm.generate(PROMPTS[:1], GREEDY, lora_request=adapters["both"])[0].token_ids
    off = LLM(base, dtype="float32", cache={"kv_cache_bytes": 4 * 2**20}, load_progress=False)
    with pytest.raises(RequestError, match="LoRA adapters are off"):
        off.generate(PROMPTS[:1], GREEDY, lora_request=adapters["both"])


def test_chat_takes_an_adapter(base, adapters) -> None:
    llm = engine(base)
    messages = [{"role": "user", "content": "Hello"}]
    plain = llm.chat(messages, GREEDY).token_ids
    tuned = llm.chat(messages, GREEDY, lora_request=adapters["both"]).token_ids
    assert tuned != plain
    prompt_ids = llm.engine.encode_chat(messages)
    assert llm.generate([prompt_ids], GREEDY, lora_request=adapters["both"])[0].token_ids == tuned


def test_tensor_parallel_shards_adapters_like_their_base_weights(base, adapters, expected) -> None:
    """TP=2 (gloo ranks): each rank holds its slice of every adapter; the tokens are TP=1's (the oracle's)."""
    llm = engine(base, max_loras=2, tensor_parallel_size=2)
    try:
        names: list[str | None] = [None, "both", "mistral", "experts"]  # three adapters, two slots
        loras = [None if n is None else adapters[n] for n in names for _ in PROMPTS]
        results = llm.generate(PROMPTS * len(names), GREEDY, lora_request=loras)
        for i, result in enumerate(results):
            name, prompt = divmod(i, len(PROMPTS))
            assert result.token_ids == expected[names[name]][prompt], f"adapter {names[name]}"
    finally:
        llm.engine.shutdown()


def test_adapters_are_read_off_the_step_loop_and_a_bad_one_fails_alone(base, adapters, expected) -> None:
    """Through `add_request` (the serving path): a new adapter is read on a thread while other requests
    step; one whose folder is gone fails with an error naming it, nothing else does."""
    llm = engine(base)
    eng = llm.engine
    eng.add_request("base", PROMPTS[0], GREEDY)
    eng.add_request("tuned", PROMPTS[0], GREEDY, lora=adapters["experts"])
    eng.add_request("gone", PROMPTS[0], GREEDY, lora=LoRARequest("gone", "/nonexistent/adapter"))
    assert set(eng._reading) == {"tuned", "gone"}  # neither is read yet on this thread
    tokens: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    while eng.has_unfinished:
        for out in eng.step():
            if out.error is not None:
                errors[out.request_id] = out.error
            for choice in out.choices:
                tokens.setdefault(out.request_id, []).extend(choice.token_ids)
    assert tokens["base"] == expected[None][0] and tokens["tuned"] == expected["experts"][0]
    assert list(errors) == ["gone"] and "/nonexistent/adapter does not exist" in errors["gone"]
    assert eng.blocks.num_used_blocks == 0 and not any(eng.lora_slots.users.values())


def test_a_step_that_fails_writing_a_slot_fails_its_requests_and_the_next_step_writes_it(
        base, adapters, expected) -> None:
    llm = engine(base, max_loras=1)
    load, failed = llm.engine.runner.lora.load, []

    def broken_once(slot, adapter):
        if not failed:
            failed.append(slot)
            raise RuntimeError("injected fault while writing a slot")
        load(slot, adapter)

    llm.engine.runner.lora.load = broken_once
    eng = llm.engine
    eng.add_request("doomed", PROMPTS[0], GREEDY, lora=adapters["both"])
    outputs = []
    while eng.has_unfinished and not outputs:  # the adapter is read on its thread first
        try:
            eng.step()
        except StepFailedError as err:  # the engine core fails the step's requests on this
            outputs = eng.fail_requests(err.request_ids, str(err))
    assert failed and outputs and "injected fault" in outputs[0].error
    assert eng.blocks.num_used_blocks == 0
    # The adapter's slot is written by the next step: the tokens are the adapter's own.
    assert [r.token_ids for r in llm.generate(PROMPTS, GREEDY, lora_request=adapters["both"])] == expected["both"]
