"""`mixtral-serve chat`: a console chat that streams tokens and reports speed after each answer.

Ctrl-C during an answer stops that answer (the conversation keeps what was said); Ctrl-C or
Ctrl-D at the prompt leaves. A conversation that outgrows the model's context loses its oldest
exchanges (the system prompt stays), with a note.
"""

from __future__ import annotations

import itertools
import signal
import sys
import time
from typing import TextIO

from engine.llm_engine import LLMEngine
from engine.lora_request import LoRARequest
from engine.outputs import RequestError
from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatTemplateError

HELP = "Commands: /reset clears the conversation, /quit leaves. Ctrl-C stops an answer."


def stream_reply(engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 out: TextIO, lora: LoRARequest | None = None) -> tuple[str, int, float, float, bool]:
    """Streams one reply to `out`; returns (text, tokens, time to first token, seconds, interrupted)."""
    # NOTE: Ctrl-C is noted and acted on between steps, never inside one, where it could leave the
    # KV block pool or a sequence half updated.
    interrupted = False

    def interrupt(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, interrupt)
    start = time.perf_counter()
    text, tokens, ttft = "", 0, 0.0
    try:
        engine.add_request(request_id, prompt_ids, params, continuation=False, lora=lora)
        while engine.has_unfinished and not interrupted:
            for output in engine.step():
                for delta in output.choices:
                    if tokens == 0:
                        ttft = time.perf_counter() - start
                    tokens += len(delta.token_ids)
                    text += delta.text
                    out.write(delta.text)
                    out.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        engine.abort_request(request_id)  # frees its KV blocks; the engine is ready for the next turn
    return text, tokens, ttft, time.perf_counter() - start, interrupted


def fit_context(engine: LLMEngine, system: list[dict[str, str]], history: list[dict[str, str]],
                params: SamplingParams) -> tuple[list[int], int]:
    """The prompt of the next reply, dropping the oldest exchanges of `history` (in place) until it
    and the answer fit the context; returns (prompt ids, exchanges dropped). Raises RequestError
    when the newest message alone does not fit."""
    dropped = 0
    while True:
        prompt_ids = engine.encode_chat(system + history)
        try:
            engine.validate(prompt_ids, params)
            return prompt_ids, dropped
        except RequestError:
            if len(history) < 3:  # the newest message is all that is left
                raise
            del history[:2]  # the oldest user message and its answer
            dropped += 1


def run_chat(engine: LLMEngine, params: SamplingParams, system: str | None,
             inp: TextIO = sys.stdin, out: TextIO = sys.stdout, lora: LoRARequest | None = None) -> None:
    history: list[dict[str, str]] = []
    head = [{"role": "system", "content": system}] if system else []
    ids = itertools.count()
    if lora is not None:
        engine.check_adapter(lora)
    adapter = "" if lora is None else f", adapter {lora.name}"
    out.write(f"mixtral-serve chat ({engine.config.model}{adapter}). {HELP}\n")
    while True:
        out.write("\n> ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # Ctrl-D, Ctrl-C or the end of piped input
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return
        if line == "/reset":
            history.clear()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/"):
            out.write(f"unknown command {line}. {HELP}\n")
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt_ids, dropped = fit_context(engine, head, history, params)
        except (ChatTemplateError, ValueError) as err:
            history.pop()
            out.write(f"error: {err}\n")
            continue
        if dropped:
            out.write(f"(dropped the oldest {dropped} exchange(s) to fit the {engine.max_model_len}-token context)\n")
        text, tokens, ttft, seconds, interrupted = stream_reply(engine, f"chat-{next(ids)}", prompt_ids, params, out,
                                                                lora)
        decode_s = max(seconds - ttft, 1e-9)
        rate = (tokens - 1) / decode_s if tokens > 1 else 0.0
        out.write(f"{' [interrupted]' if interrupted else ''}\n[context {len(prompt_ids)} tokens | {tokens} tokens, "
                  f"time to first token {ttft * 1000:.0f} ms, {rate:.1f} tokens/s]\n")
        history.append({"role": "assistant", "content": text})
