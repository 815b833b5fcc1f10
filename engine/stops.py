"""After sampling: a sequence's new token checked against its stops and limits, detokenised,
and turned into the delta its request streams (text held back while a stop string may form)."""

from __future__ import annotations

from engine.outputs import ChoiceDelta
from engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob


def check_stop(seq: Sequence, token: int, eos_id: int, max_len: int) -> None:
    """Finishes `seq` if `token` (just appended) ends it, and appends the token's text otherwise.

    `max_len`: the most tokens a sequence may hold (context length, or the whole KV pool).
    """
    params = seq.params
    n_out = seq.num_output_tokens
    can_stop = n_out >= params.min_tokens
    text_before = len(seq.text)
    if can_stop and token == eos_id and not params.ignore_eos:
        _finish(seq, "stop", None)
    elif can_stop and token in params.stop_token_ids:
        _finish(seq, "stop", token)
    else:
        seq.text += seq.detokenizer.step([token])
        if can_stop and params.stop:
            # Only the new text (plus a stop string's length of overlap) can hold a new match.
            window_start = max(0, text_before - max(len(s) for s in params.stop) + 1)
            hits = [(seq.text.find(s, window_start), s) for s in params.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, stop = min(hits)
                seq.text = seq.text[:idx]
                _finish(seq, "stop", stop)
    if not seq.is_finished and seq.matcher is not None and seq.matcher.is_stopped():
        _finish(seq, "stop", None)  # the grammar is complete: nothing may follow
    if not seq.is_finished:
        if params.max_tokens is not None and n_out >= params.max_tokens:
            _finish(seq, "length", None)
        elif seq.num_tokens >= max_len:
            # The pool bounds a sequence as the context does (`validate` only sees max_tokens):
            # one that outgrew the whole pool would preempt itself and never be readmitted.
            _finish(seq, "length", None)


def _finish(seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
    seq.stop_reason = stop_reason


def choice_delta(seq: Sequence, token: int, logprob: TokenLogprob | None) -> ChoiceDelta:
    # NOTE: while a stop string could still be forming, hold back that many characters so
    # a client never sees text that is later cut.
    hold = 0 if seq.is_finished or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
    end = max(seq.num_text_emitted, len(seq.text) - hold)
    text = seq.text[seq.num_text_emitted : end]
    seq.num_text_emitted = end
    return ChoiceDelta(
        index=seq.index,
        token_ids=[token],
        text=text,
        logprobs=[logprob] if logprob else [],
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
