"""Offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.lora_request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.sequence import TokenLogprob


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class GenerationResult:
    """One prompt's result; `.token_ids`, `.text` and `.finish_reason` are its first choice's."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


class LLM:
    def __init__(self, model: str | Path | None = None, *, config: EngineConfig | None = None,
                 **engine_kwargs: Any) -> None:
        """`LLM(DIR, dtype=..., cache={...})` (EngineConfig's fields), or `LLM(config=EngineConfig(...))`.
        No model: the embedded tiny checkpoint."""
        if config is None:
            config = EngineConfig(model=None if model is None else str(model), **engine_kwargs)
        elif model is not None or engine_kwargs:
            raise TypeError("give either config= or model and EngineConfig fields, not both")
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[GenerationResult]:
        """Runs every prompt to completion in shared batches; results keep the input order.
        `params`, `lora_request`: one for every prompt, or a list with one per prompt (as vLLM's)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        encoded = [
            self.tokenizer.encode(p, add_bos=True) if isinstance(p, str) else list(p) for p in prompts
        ]
        return self._run(encoded, params or SamplingParams(), lora_request, continuation=True)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None,
             lora_request: LoRARequest | None = None) -> GenerationResult:
        """One assistant reply to a conversation, through the checkpoint's chat template."""
        prompt_ids = self.engine.encode_chat(messages)
        return self._run([prompt_ids], params or SamplingParams(), lora_request, continuation=False)[0]

    @staticmethod
    def _per_prompt(value: Any, single: type | None, count: int, what: str) -> list[Any]:
        """One value for each prompt: the same one for all, or a list of one each."""
        values = [value] * count if value is None or isinstance(value, single) else list(value)  # type: ignore[arg-type]
        if len(values) != count:
            raise ValueError(f"{len(values)} {what} for {count} prompts")
        return values

    def _run(
        self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams],
        lora: LoRARequest | Sequence[LoRARequest | None] | None, continuation: bool,
    ) -> list[GenerationResult]:
        per_prompt = self._per_prompt(params, SamplingParams, len(prompts), "SamplingParams")
        adapters = self._per_prompt(lora, LoRARequest, len(prompts), "LoRARequests")
        # All or nothing: a bad prompt or adapter must not strand the others.
        for prompt_ids, p, adapter in zip(prompts, per_prompt, adapters):
            self.engine.validate(prompt_ids, p)
            if adapter is not None:
                self.engine.check_adapter(adapter)
        results: dict[str, GenerationResult] = {}
        for prompt_ids, p, adapter in zip(prompts, per_prompt, adapters):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, prompt_ids, p, continuation=continuation, lora=adapter)
            results[request_id] = GenerationResult(
                request_id, prompt_ids, [CompletionOutput(i) for i in range(p.n)]
            )
        while self.engine.has_unfinished:
            for out in self.engine.step():
                result = results[out.request_id]
                result.num_cached_tokens = out.num_cached_tokens
                for delta in out.choices:
                    choice = result.outputs[delta.index]
                    choice.token_ids.extend(delta.token_ids)
                    choice.text += delta.text
                    choice.logprobs.extend(delta.logprobs)
                    choice.finish_reason = delta.finish_reason
                    choice.stop_reason = delta.stop_reason
        return list(results.values())
