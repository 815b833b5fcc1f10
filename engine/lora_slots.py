"""Which adapter each device slot holds, and who uses it (the scheduler's bookkeeping, host only).

A sequence takes a slot when it is admitted and gives it back when it stops running. An adapter
not resident goes into a free slot, else into the least recently used slot no running sequence
uses; when every slot is in use, its sequences wait. Loads are handed to the next step, which
writes the weights on every rank before it runs.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

from engine.lora_request import LoRARequest


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.resident: OrderedDict[str, int] = OrderedDict()  # adapter key -> slot, least recent first
        self.users: Counter[int] = Counter()  # slot -> running sequences
        self.free = list(range(num_slots - 1, -1, -1))
        self._loads: list[tuple[int, LoRARequest]] = []
        self.loads_total = 0  # adapters written into a slot since start

    def acquire(self, request: LoRARequest) -> int | None:
        """The slot holding `request`'s adapter for one more running sequence, or None (every slot busy)."""
        slot = self.resident.get(request.key)
        if slot is None:
            if self.free:
                slot = self.free.pop()
            else:
                idle = next((key for key, s in self.resident.items() if self.users[s] == 0), None)
                if idle is None:
                    return None
                slot = self.resident.pop(idle)
            self.resident[request.key] = slot
            self._loads.append((slot, request))
            self.loads_total += 1
        self.resident.move_to_end(request.key)
        self.users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.users[slot] -= 1

    def evict(self, request: LoRARequest) -> bool:
        """Frees the adapter's slot now if nothing runs on it (an unloaded adapter); False otherwise."""
        slot = self.resident.get(request.key)
        if slot is None or self.users[slot]:
            return False
        del self.resident[request.key]
        self.free.append(slot)
        return True

    def take_loads(self) -> list[tuple[int, LoRARequest]]:
        """Slot writes the next step must do first."""
        loads, self._loads = self._loads, []
        return loads

    def retry(self, loads: list[tuple[int, LoRARequest]]) -> None:
        """Slot writes a failed step may not have done: the next step does them again."""
        self._loads = loads + self._loads
