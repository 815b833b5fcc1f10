"""Which LoRA adapter a request runs with (torch-free: the serving layer builds it too)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name and folder (PEFT's `adapter_config.json` + `adapter_model.safetensors`, or
    mistral-finetune's `params.json` + `lora.safetensors`). The engine loads it on first use."""

    name: str
    path: str

    @property
    def key(self) -> str:
        """What identifies the adapter's weights: a name reloaded from another folder is another adapter
        (its KV blocks are not shared with the old one's)."""
        return f"{self.name}\0{self.path}"
