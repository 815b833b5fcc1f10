"""mixtral-serve's engine: a Mixtral LLM engine in PyTorch. Knows nothing of Ray or HTTP."""

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm import LLM, GenerationResult
from engine.sampling import SamplingParams

__all__ = ["LLM", "GenerationResult", "SamplingParams", "EngineConfig", "CacheConfig", "SchedulerConfig"]
