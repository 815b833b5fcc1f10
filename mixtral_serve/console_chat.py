"""`mixtral-serve chat`: a console chat that streams tokens and reports speed after each answer."""

from __future__ import annotations

import itertools
import sys
import time
from typing import TextIO

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import ChatTemplateError

HELP = "Commands: /reset clears the conversation, /quit leaves."


def stream_reply(engine: LLMEngine, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 out: TextIO) -> tuple[str, int, float, float]:
    """Streams one reply to `out`; returns (text, tokens, time to first token, seconds)."""
    start = time.perf_counter()
    engine.add_request(request_id, prompt_ids, params, continuation=False)
    text, tokens, ttft = "", 0, 0.0
    while engine.has_unfinished:
        for output in engine.step():
            for delta in output.choices:
                if tokens == 0:
                    ttft = time.perf_counter() - start
                tokens += len(delta.token_ids)
                text += delta.text
                out.write(delta.text)
                out.flush()
    return text, tokens, ttft, time.perf_counter() - start


def run_chat(engine: LLMEngine, params: SamplingParams, system: str | None,
             inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    history: list[dict[str, str]] = []
    ids = itertools.count()
    out.write(f"mixtral-serve chat ({engine.config.model}). {HELP}\n")
    while True:
        out.write("\n> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
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
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        try:
            prompt_ids = engine.encode_chat(messages)
            engine.validate(prompt_ids, params)
        except (ChatTemplateError, ValueError) as err:
            out.write(f"error: {err}\n")
            continue
        text, tokens, ttft, seconds = stream_reply(engine, f"chat-{next(ids)}", prompt_ids, params, out)
        decode_s = max(seconds - ttft, 1e-9)
        rate = (tokens - 1) / decode_s if tokens > 1 else 0.0
        out.write(f"\n[context {len(prompt_ids)} tokens | {tokens} tokens, time to first token "
                  f"{ttft * 1000:.0f} ms, {rate:.1f} tokens/s]\n")
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": text}]
