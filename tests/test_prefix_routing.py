"""The prefix-affinity policy (deployments/prefix_routing.py), decision by decision, without Ray."""

from __future__ import annotations

from deployments.prefix_routing import PrefixIndex, block_hashes, choose, request_text
from deployments.protocol import GenerateRequest
from engine.lora_request import LoRARequest
from engine.sampling_params import SamplingParams

PARAMS = SamplingParams()
SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 20}


def chat(*turns: str, lora: LoRARequest | None = None) -> GenerateRequest:
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return GenerateRequest("r", PARAMS, messages=messages, lora=lora)


def hashes(request: GenerateRequest, block: int = 32) -> list[int]:
    return block_hashes(request_text(request), block, request.lora and request.lora.key)


def test_a_later_turn_extends_the_earlier_ones_text() -> None:
    first = request_text(chat("Tell me about rivers."))
    second = request_text(chat("Tell me about rivers.", "Rivers flow.", "And lakes?"))
    assert second.startswith(first) and len(second) > len(first)
    earlier = hashes(chat("Tell me about rivers."))
    assert hashes(chat("Tell me about rivers.", "Rivers flow.", "And lakes?"))[: len(earlier)] == earlier
    # A prompt and token ids work too; only whole blocks are hashed.
    assert len(block_hashes("x" * 100, 32, None)) == 3
    assert request_text(GenerateRequest("r", PARAMS, prompt=[1, 22, 333])) == "1,22,333"


def test_adapters_never_share_blocks() -> None:
    sql = LoRARequest("sql", "/a/sql")
    assert set(hashes(chat("Hi"))).isdisjoint(hashes(chat("Hi", lora=sql)))


def test_affinity_wins_while_load_is_balanced_and_gives_way_when_not() -> None:
    index = PrefixIndex()
    conversation = hashes(chat("Plan a trip to Oslo."))
    index.record(conversation, "b")
    later = hashes(chat("Plan a trip to Oslo.", "Sure: day one...", "And day two?"))
    decision = choose(index, later, {"a": 0, "b": 3}, imbalance_threshold=4)
    assert (decision.replica, decision.kind) == ("b", "affinity") and decision.matched_blocks == len(conversation)
    busy = choose(index, later, {"a": 0, "b": 5}, imbalance_threshold=4)
    assert (busy.replica, busy.kind) == ("a", "imbalanced")
    fresh = choose(index, hashes(GenerateRequest("r", PARAMS, prompt="unrelated " * 40)), {"a": 2, "b": 1}, 4)
    assert (fresh.replica, fresh.kind) == ("b", "no_match")  # the least loaded
    # The longest match wins; equal matches go to the less loaded replica.
    index.record(later, "a")
    assert choose(index, later, {"a": 1, "b": 1}, 4).replica == "a"
    assert choose(index, conversation, {"a": 2, "b": 1}, 4).replica == "b"


def test_replicas_that_leave_are_forgotten_and_the_index_is_bounded() -> None:
    index = PrefixIndex()
    conversation = hashes(chat("Hello there, how are you today?"))
    index.record(conversation, "a")
    index.record(conversation, "b")
    index.forget("a")
    assert choose(index, conversation, {"a": 0, "b": 0}, 4).replica == "b"
    index.forget("b")
    assert len(index) == 0
    index = PrefixIndex(max_blocks=10)
    for i in range(50):
        index.record(hashes(GenerateRequest("r", PARAMS, prompt=f"{i} " * 80)), "a")
    assert len(index) == 10


def test_conversations_stick_to_a_replica_and_spread_over_both() -> None:
    """Twelve conversations of five turns over two replicas, each replica's load the conversations it
    holds: every turn after the first goes where its conversation began, and the replicas end with
    six conversations each."""
    index = PrefixIndex()
    home: dict[int, str] = {}
    loads = {"a": 0.0, "b": 0.0}
    for turn in range(5):
        for c in range(12):
            turns = [f"Conversation {c} asks question {t} at length. " * 3 if t % 2 == 0 else f"Answer {t}. " * 5
                     for t in range(2 * turn + 1)]
            decision = choose(index, hashes(chat(*turns)), loads, imbalance_threshold=4)
            index.record(hashes(chat(*turns)), decision.replica)
            if turn == 0:
                home[c] = decision.replica
                loads[decision.replica] += 1
            else:
                assert decision.replica == home[c] and decision.kind == "affinity", (turn, c)
    assert loads == {"a": 6, "b": 6}


def test_a_shared_system_prompt_does_not_herd_new_conversations() -> None:
    """Six new conversations behind one system prompt, each still running when the next arrives: the
    first replica holds the prompt first, yet the allowance (2 requests while the load is low) sends
    the fourth to the other replica, after which both hold it and load decides."""
    index = PrefixIndex()
    loads = {"a": 0.0, "b": 0.0}
    for c in range(6):
        request = hashes(chat(f"New question number {c}, asked at some length to fill a block."))
        decision = choose(index, request, loads, imbalance_threshold=2, imbalance_ratio=0.25)
        index.record(request, decision.replica)
        loads[decision.replica] += 1
    assert loads == {"a": 3, "b": 3}
    # Busy, the allowance grows with the mean load: 40 requests each, a replica 9 busier keeps its conversation.
    assert choose(index, request, {"a": 36, "b": 45}, 2, 0.25).kind == "affinity"
    assert choose(index, request, {"a": 30, "b": 45}, 2, 0.25).kind == "imbalanced"
