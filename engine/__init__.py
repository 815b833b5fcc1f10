"""mixtral-serve's engine: a Mixtral LLM engine in PyTorch. Knows nothing of Ray or HTTP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
from engine.lora_request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput

if TYPE_CHECKING:
    from engine.llm import LLM, GenerationResult

__all__ = ["LLM", "GenerationResult", "SamplingParams", "StructuredOutput", "EngineConfig", "CacheConfig",
           "SchedulerConfig", "LoRAConfig", "LoRARequest"]


def __getattr__(name: str) -> Any:
    # NOTE: the offline API loads torch and the model code; importing the package (or its
    # torch-free configuration) must not, so the router and config tools stay light.
    if name in ("LLM", "GenerationResult"):
        from engine import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
