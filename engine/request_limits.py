"""What a request may ask of a loaded engine: checked before any work, in whichever process
takes the request (the engine's own, or the async front of an engine core in another process)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import RequestError
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    kv_capacity_tokens: int

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Rejects a request that could never complete."""
        n = len(prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            raise RequestError(f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        wanted = n + (params.max_tokens or 0)
        if n >= self.max_model_len or wanted > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({n} in the prompt, {params.max_tokens or 0} in the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens" if n < self.max_model_len else "prompt",
            )
        if wanted > self.kv_capacity_tokens:
            raise RequestError(
                f"the request needs {wanted} tokens of KV cache but the whole cache holds "
                f"{self.kv_capacity_tokens}",
                param="max_tokens",
            )
