"""Which tokens of which sequences run in the next step.

Running sequences are served first (decodes and unfinished prompt chunks), waiting ones fill
the rest of the token budget. Long prompts are chunked so decodes keep flowing while a big
prompt is prefilled. When KV blocks run out, the least important running sequence is
preempted: its blocks are freed and it is recomputed later (its prefix may still be cached).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.config import SchedulerConfig
from engine.kv_cache import BlockManager
from engine.latency_controller import LatencyController
from engine.lora_slots import SlotTable
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens to compute this step, starting at seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, lora_slots: SlotTable | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.lora_slots = lora_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # A step-time target turns the caps adaptive (see latency_controller.py).
        self.controller = LatencyController(config.target_step_seconds) if config.target_step_seconds else None
        self._step_in_flight: tuple[float, int, int] | None = None  # (start, seqs, tokens) of the last batch

    def reconfigure(self, config: SchedulerConfig) -> None:
        """Live tuning: new caps apply from the next step; running work is left alone."""
        self.config = config
        if config.target_step_seconds is None:
            self.controller = None
        elif self.controller is None:
            self.controller = LatencyController(config.target_step_seconds)
        else:
            self.controller.target_seconds = config.target_step_seconds  # keep what it has learned

    def _limits(self, now: float) -> tuple[int, int]:
        """(token budget, sequence cap) for this step; feeds the controller the last step's period.

        NOTE: the period runs from one schedule() to the next, so it counts everything a running
        sequence waits between two tokens (model, sampling, delivery), not just the forward pass.
        """
        cfg = self.config
        if self.controller is None:
            return cfg.max_num_batched_tokens, cfg.max_num_seqs
        if self._step_in_flight is not None:
            start, seqs, tokens = self._step_in_flight
            self.controller.observe(now - start, seqs, tokens)
        max_seqs = self.controller.max_seqs(cfg.max_num_seqs)
        # Priced as a full step; each admission below is priced again as it joins.
        budget = self.controller.step_tokens(max(len(self.running), max_seqs), cfg.max_num_batched_tokens)
        return budget, max_seqs

    def _sort_key(self, seq: Sequence) -> tuple[int, float]:
        priority = seq.priority if self.config.policy == "priority" else 0
        return (priority, seq.arrival_time)

    def add(self, seq: Sequence) -> None:
        if self.config.policy == "priority":
            items = sorted([*self.waiting, seq], key=self._sort_key)
            self.waiting = deque(items)
        else:
            self.waiting.append(seq)

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot >= 0:
            assert self.lora_slots is not None
            self.lora_slots.release(seq.lora_slot)
            seq.lora_slot = -1

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        self._release_adapter(seq)
        if not self.has_work:
            self._step_in_flight = None  # the engine idles now: the next period is not a step

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        if self.config.policy == "priority":
            self.add(seq)  # back in priority order: it must not jump ahead of more urgent work
        else:
            self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        now = time.monotonic()
        budget, max_num_seqs = self._limits(now)
        out: list[ScheduledSeq] = []
        preempted = False
        # 1. Running sequences, most important first; the least important give way.
        self.running.sort(key=self._sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.blocks.can_append(seq, num_new):
                victim = self.running[-1]  # never one already scheduled: those sit before `seq`
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SequenceStatus.WAITING:
                break  # `seq` and everything after it were preempted
            self.blocks.append_slots(seq, num_new)
            out.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        # 2. Waiting sequences, in order, while budget, sequence cap and blocks allow. One whose adapter
        # finds no slot (every slot runs other adapters) waits; those behind it go on.
        no_slot: list[Sequence] = []
        while self.waiting and budget > 0 and not preempted and len(self.running) < max_num_seqs:
            seq = self.waiting[0]
            if seq.parent is not None and seq.parent.in_prefill and not seq.parent.is_finished:
                break
            if seq.lora is not None and not self._take_adapter(seq):
                no_slot.append(self.waiting.popleft())
                continue
            hits = len(self.blocks.match_prefix(seq)) * self.blocks.block_size
            num_new = min(seq.num_tokens - hits, budget)
            if self.controller is not None:  # one more sequence in the step: its chunk must still fit
                scheduled = sum(s.num_new_tokens for s in out)
                num_new = min(num_new, self.controller.step_tokens(len(out) + 1, budget + scheduled) - scheduled)
                if num_new <= 0:
                    self._release_adapter(seq)
                    break
            if not self.blocks.admit(seq, num_new):
                self._release_adapter(seq)
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(no_slot))
        self._step_in_flight = (now, len(out), sum(s.num_new_tokens for s in out)) if out else None
        return out

    def _take_adapter(self, seq: Sequence) -> bool:
        assert self.lora_slots is not None and seq.lora is not None
        slot = self.lora_slots.acquire(seq.lora)
        if slot is None:
            return False
        seq.lora_slot = slot
        return True
