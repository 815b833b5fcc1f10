"""The synchronous engine: requests in, one scheduled model step at a time, deltas out."""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import torch

from engine.checkpoint import default_model_dir
from engine.config import EngineConfig, SchedulerConfig
from engine.grammar import GrammarCompiler, GrammarError
from engine.kv_cache import BlockManager
from engine.lora_adapter import AdapterError, LoRAAdapter
from engine.lora_request import LoRARequest
from engine.lora_slots import SlotTable
from engine.model_runner import StepOutput, build_runner
from engine.outputs import (
    ChoiceDelta,
    EngineDeadError,
    EngineStats,
    RequestError,
    RequestOutput,
    StepFailedError,
)
from engine.ranks import (
    RankPlacement,
    WorkerLauncher,
    launch_local,
    start_ranks,
    stop_ranks,
)
from engine.request_limits import RequestLimits
from engine.sampling import make_generator
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledSeq, Scheduler
from engine.sequence import Sequence, SequenceStatus, TokenLogprob
from engine.stops import check_stop, choice_delta
from engine.tokenizer import ChatMessage, Tokenizer

log = logging.getLogger(__name__)

_PENDING_WAIT_S = 0.01  # an idle step waits this long for a grammar compiling or an adapter being read


class LLMEngine:
    def __init__(self, config: EngineConfig, launcher: WorkerLauncher = launch_local,
                 placement: RankPlacement = RankPlacement()) -> None:
        """`launcher` starts tensor-parallel ranks > 0 (local processes by default; the
        serving layer passes one that starts them as actors in its placement group, and where
        they run)."""
        if config.model is None:  # the embedded default, written on first use
            config = config.model_copy(update={"model": str(default_model_dir())})
        self.config = config
        model_dir = Path(config.model)
        self.tokenizer = Tokenizer.from_dir(model_dir, config.chat_template)
        torch.manual_seed(secrets.randbits(63) if config.seed is None else config.seed)
        t0 = time.perf_counter()
        world = config.tensor_parallel_size
        tp, self.workers = start_ranks(config, launcher, placement)
        self.runner = build_runner(config, tp, self.tokenizer.eos_id)
        # NOTE: also when the engine is collected or the interpreter exits, where multiprocessing
        # would otherwise kill local ranks mid-loop; it holds the group and handles, not the model.
        self._stop_ranks = weakref.finalize(self, stop_ranks, tp, self.workers)
        self.load_seconds = time.perf_counter() - t0
        self.model = self.runner.model
        self.model_config = cfg = self.model.cfg
        self.dtype = self.model.embed.dtype
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.blocks = BlockManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.lora_slots = SlotTable(config.lora.max_loras) if config.lora.max_loras else None
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.lora_slots)
        log.info(
            "engine ready: %s in %s (tensor parallel %d), loaded in %.1fs; KV cache holds %d tokens",
            model_dir, str(self.dtype).removeprefix("torch."), world, self.load_seconds, self.kv_capacity_tokens,
        )
        self.requests: dict[str, list[Sequence]] = {}
        # NOTE: built now, not at the first constrained request: it reads the whole vocabulary
        # (~0.1 s), which would stall that step for every request.
        self.grammars = GrammarCompiler(self.tokenizer)
        self._compiling: dict[str, Future] = {}  # request id -> its grammar, still compiling
        # NOTE: adapters are read from disk on a thread of their own (a large one takes seconds);
        # requests wait for theirs, the steps of the others go on.
        self._adapter_reader = ThreadPoolExecutor(1, thread_name_prefix="lora-read")
        self._reading: dict[str, Future[LoRAAdapter]] = {}  # request id -> its adapter, being read
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps = 0
        self._last_step = 0.0
        self._last_batch = (0, 0)

    # ---- requests ------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def encode_chat(self, messages: list[ChatMessage | dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.model_config.vocab_size, self.max_model_len, self.kv_capacity_tokens)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Rejects, before any work, a request that could never complete."""
        self.limits.check(prompt_ids, params)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        continuation: bool = True,
        lora: LoRARequest | None = None,
    ) -> int:
        """Queues a request; returns its prompt length. `continuation=False` for chat replies; `lora`:
        the adapter it runs with (read and checked now, so a bad one fails this request alone)."""
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        prompt_ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        self.validate(prompt_ids, params)
        if lora is not None and self.lora_slots is None:
            raise RequestError("LoRA adapters are off in this engine: set lora.max_loras above 0", param="model")
        seqs: list[Sequence] = []
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            seqs.append(
                Sequence(
                    request_id=request_id,
                    index=index,
                    token_ids=list(prompt_ids),
                    num_prompt_tokens=len(prompt_ids),
                    params=params,
                    detokenizer=self.tokenizer.detokenizer(prompt_ids, continuation),
                    generator=make_generator(seed),
                    priority=priority,
                    parent=seqs[0] if seqs else None,
                    lora=lora,
                )
            )
        self.requests[request_id] = seqs
        # Scheduled once its grammar is compiled and its adapter read (at once when they are cached).
        if params.structured_output is not None:
            self._compiling[request_id] = self.grammars.compile(params.structured_output)
        if lora is not None and not self.runner.adapters.holds(lora):
            self._reading[request_id] = self._adapter_reader.submit(self.runner.adapters.read, lora)
        if request_id not in self._compiling and request_id not in self._reading:
            for seq in seqs:
                self.scheduler.add(seq)
        return len(prompt_ids)

    def check_adapter(self, lora: LoRARequest) -> None:
        """Reads the adapter now (cached after the first time); RequestError naming what is wrong with it."""
        if self.lora_slots is None:
            raise RequestError("LoRA adapters are off in this engine: set lora.max_loras above 0", param="model")
        try:
            self.runner.adapters.get(lora)
        except AdapterError as err:
            raise RequestError(f"adapter {lora.name!r}: {err}", param="model") from None

    def unload_adapter(self, lora: LoRARequest) -> None:
        """Forgets the adapter's weights read from disk and frees its slot once nothing runs on it
        (it reloads from disk if used again)."""
        self.runner.adapters.drop(lora)
        if self.lora_slots is not None:
            self.lora_slots.evict(lora)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request now and frees its KV blocks.

        Returns its final output (finish_reason "abort" for each choice still going), so a
        caller waiting on the request learns it ended; None when it is unknown or done.
        """
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        self._compiling.pop(request_id, None)
        self._reading.pop(request_id, None)
        choices = []
        for seq in seqs:
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "abort"
                self.scheduler.remove(seq)
                choices.append(ChoiceDelta(index=seq.index, token_ids=[], text="", finish_reason="abort"))
        return self._request_output(request_id, seqs, choices)

    def fail_requests(self, request_ids: list[str], message: str) -> list[RequestOutput]:
        """Ends these requests with an error and frees their blocks (used when a step raised)."""
        outputs = []
        for request_id in request_ids:
            seqs = self.requests.get(request_id)
            if seqs is not None:
                self.abort_request(request_id)
                outputs.append(self._request_output(request_id, seqs, [], error=message))
        return outputs

    def reconfigure(self, tuning: SchedulerConfig) -> None:
        """Live tuning: new scheduler knobs apply from the next step; running work is left alone."""
        self.config = self.config.model_copy(update={"scheduler": tuning})
        self.scheduler.reconfigure(tuning)

    def latency_fit(self) -> dict[str, float] | None:
        """The fixed-latency controller's step-time model and recent p90 period; None without a target."""
        controller = self.scheduler.controller
        if controller is None:
            return None
        return {**dict(zip(("overhead_s", "per_seq_s", "per_token_s"), controller.fit())),
                "step_period_p90_s": controller.recent_p90()}

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Stops the tensor-parallel ranks (no-op without tensor parallelism; once)."""
        self.grammars.close()
        self._adapter_reader.shutdown(wait=False, cancel_futures=True)
        self._stop_ranks()

    def check_ranks(self) -> None:
        """Raises EngineDeadError when a tensor-parallel rank's process has ended."""
        dead = [rank for rank, worker in enumerate(self.workers, start=1) if not worker.is_alive()]
        if dead:
            raise EngineDeadError(f"tensor-parallel rank(s) {dead} died")

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        failed = self._admit_ready()
        batch = self.scheduler.schedule()
        if not batch:
            pending = [*self._compiling.values(), *self._reading.values()]
            if pending and not failed:
                wait(pending, timeout=_PENDING_WAIT_S, return_when=FIRST_COMPLETED)
            return failed
        self.check_ranks()
        computed_before = {id(s.seq): s.seq.num_computed_tokens for s in batch}
        loads = self.lora_slots.take_loads() if self.lora_slots is not None else None
        try:
            result = self.runner.execute(batch, self._grammar_masks(batch), loads)
        except EngineDeadError:
            raise
        except Exception as err:
            # NOTE: a failed step wrote KV only for its own sequences; requests outside the batch
            # keep their state and go on. Adapter slots it was to write are written by the next one.
            if loads:
                assert self.lora_slots is not None
                self.lora_slots.retry(loads)
            raise StepFailedError(list(dict.fromkeys(s.seq.request_id for s in batch)), err) from err
        for item in batch:
            seq = item.seq
            before = computed_before[id(seq)]
            seq.num_computed_tokens += item.num_new_tokens
            self._prompt_tokens += max(0, min(seq.num_computed_tokens, seq.num_prompt_tokens) - before)
            self.blocks.cache_full_blocks(seq, before)
        outputs = failed + self._process(result)
        self._steps += 1
        self._last_step = time.perf_counter() - t0
        self._last_batch = (sum(s.num_new_tokens for s in batch), len(batch))
        return outputs

    def _admit_ready(self) -> list[RequestOutput]:
        """Schedules the requests whose grammar is compiled and adapter read; fails those whose grammar
        did not compile or adapter could not be read."""
        failed: list[RequestOutput] = []
        for request_id, read in list(self._reading.items()):
            if not read.done():
                continue
            del self._reading[request_id]
            lora = self.requests[request_id][0].lora
            assert lora is not None
            try:
                self.runner.adapters.put(lora, read.result())
            except AdapterError as err:
                failed += self.fail_requests([request_id], f"adapter {lora.name!r}: {err}")
                continue
            if request_id not in self._compiling:
                for seq in self.requests[request_id]:
                    self.scheduler.add(seq)
        for request_id, compiled in list(self._compiling.items()):
            if not compiled.done():
                continue
            del self._compiling[request_id]
            seqs = self.requests[request_id]
            try:
                for seq in seqs:
                    seq.matcher = self.grammars.matcher(compiled)
            except GrammarError as err:
                failed += self.fail_requests([request_id], f"structured output does not compile: {err}")
                continue
            if request_id not in self._reading:
                for seq in seqs:
                    self.scheduler.add(seq)
        return failed

    def _grammar_masks(self, batch: list[ScheduledSeq]) -> dict[int, torch.Tensor]:
        """By seq_id, the next-token bit mask [W] of each constrained sequence that samples this step."""
        constrained = [s.seq for s in batch if s.samples and s.seq.matcher is not None]
        if not constrained:
            return {}
        masks = self.grammars.masks([seq.matcher for seq in constrained])  # type: ignore[misc]  # [R, W]
        return {seq.seq_id: masks[i] for i, seq in enumerate(constrained)}

    def _process(self, result: StepOutput) -> list[RequestOutput]:
        deltas: dict[str, list[ChoiceDelta]] = {}
        tok = result.tokens
        for row, item in enumerate(result.sampled):
            seq = item.seq
            token = tok.token_ids[row]
            seq.token_ids.append(token)
            self._generation_tokens += 1
            logprob = None
            if tok.logprobs is not None and seq.params.logprobs is not None:
                assert tok.top_logprobs is not None
                logprob = TokenLogprob(token, tok.logprobs[row], tok.top_logprobs[row])
                seq.logprobs.append(logprob)
            if seq.matcher is not None and not seq.matcher.consume_token(token):
                # Only a token outside the mask gets here (min_tokens forbidding the one token the
                # grammar allows leaves the row nothing to sample): the grammar cannot go on.
                log.warning("request %s: token %d breaks its grammar: %s", seq.request_id, token,
                            seq.matcher.get_error())
            check_stop(seq, token, self.tokenizer.eos_id, min(self.max_model_len, self.kv_capacity_tokens))
            deltas.setdefault(seq.request_id, []).append(choice_delta(seq, token, logprob))
        outputs: list[RequestOutput] = []
        for request_id, choice_deltas in deltas.items():
            seqs = self.requests[request_id]
            for seq in seqs:
                if seq.is_finished and seq.block_table:
                    self.scheduler.remove(seq)
            outputs.append(self._request_output(request_id, seqs, choice_deltas))
            if all(s.is_finished for s in seqs):
                del self.requests[request_id]
        return outputs

    def _request_output(
        self, request_id: str, seqs: list[Sequence], choices: list[ChoiceDelta], error: str | None = None
    ) -> RequestOutput:
        first = seqs[0]
        queue = None if first.first_scheduled_time is None else first.first_scheduled_time - first.arrival_time
        return RequestOutput(
            request_id=request_id,
            choices=choices,
            finished=all(s.is_finished for s in seqs),
            num_prompt_tokens=first.num_prompt_tokens,
            num_cached_tokens=first.num_cached_prompt_tokens,
            num_output_tokens=sum(s.num_output_tokens for s in seqs),
            queue_time=queue,
            error=error,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            kv_capacity_tokens=self.kv_capacity_tokens,
            prefix_cache_queries=self.blocks.prefix_queries,
            prefix_cache_hits=self.blocks.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            steps_total=self._steps,
            last_step_seconds=self._last_step,
            last_batch_tokens=self._last_batch[0],
            last_batch_seqs=self._last_batch[1],
            expert_tokens=self.runner.expert_counts.view(self.model_config.num_hidden_layers, -1).tolist(),
            lora_resident=0 if self.lora_slots is None else len(self.lora_slots.resident),
            lora_slot_loads_total=0 if self.lora_slots is None else self.lora_slots.loads_total,
            lora_reads_total=self.runner.adapters.reads_total,
            lora_read_seconds_total=self.runner.adapters.read_seconds_total,
        )
