"""Sampler tests: parameter validation, greedy, truncation distributions, penalties,
min_tokens, seed reproducibility across batch compositions, and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampling import Sampler, SamplerOutput, SamplingRow, make_generator
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

sampler = Sampler()


def _row(
    params: SamplingParams,
    *,
    output_ids: list[int] | None = None,
    prompt_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    eos_id: int = 0,
) -> SamplingRow:
    return SamplingRow(params, prompt_ids or [], output_ids or [], generator, eos_id)


# ---------------------------------------------------------------------------------------
# Parameter validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop_token_ids": [-3]}, "stop_token_ids"),
        ({"stop": [""]}, "stop"),
        ({"best_of": 2}, "best_of"),  # extra="forbid"
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_params_and_normalisation() -> None:
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS
    assert SamplingParams(top_k=0).top_k == 0
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1).greedy
    assert not SamplingParams().greedy
    assert not SamplingParams().has_penalties
    assert SamplingParams(presence_penalty=0.1).has_penalties


def test_make_generator() -> None:
    assert make_generator(None) is None
    a, b = make_generator(5), make_generator(5)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert make_generator(-1) is not None  # any Python int is folded into torch's seed range


# ---------------------------------------------------------------------------------------
# Greedy


def test_greedy_is_argmax_on_fast_and_slow_paths() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    greedy = [_row(SamplingParams(temperature=0.0)) for _ in range(8)]
    out = sampler(logits, greedy)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None

    # top_k == 1 is greedy too; one row asking for logprobs and sampled rows force the slow path.
    mixed = [_row(SamplingParams(top_k=1, temperature=0.7))]
    mixed += [_row(SamplingParams(temperature=0, logprobs=2))]
    mixed += [_row(SamplingParams(temperature=1.0)) for _ in range(6)]
    out = sampler(logits, mixed)
    assert out.token_ids[:2] == logits[:2].argmax(-1).tolist()
    assert out.logprobs is not None


def test_greedy_ties_pick_the_lowest_id() -> None:
    logits = torch.full((64, 32000), -1.0)
    logits[:, [31999, 20000, 25000]] = 5.0
    logits[3, 7] = 5.0
    out = sampler(logits, [_row(SamplingParams(temperature=0.0)) for _ in range(64)])
    assert out.token_ids == [7 if i == 3 else 20000 for i in range(64)]


def test_bad_logits_shape_rejected() -> None:
    with pytest.raises(ValueError, match="shape"):
        sampler(torch.zeros(3, 10), [_row(SamplingParams())])


# ---------------------------------------------------------------------------------------
# Truncation: top-k, top-p, min-p, temperature

# Probabilities deliberately not in id order, so a sort that is not scattered back would show.
PROBS = torch.tensor([0.07, 0.30, 0.005, 0.15, 0.10, 0.03, 0.20, 0.08, 0.015, 0.05])
NUM_DRAWS = 2000


def _kept(*values: float) -> list[int]:
    return [int((PROBS - v).abs().argmin()) for v in values]


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_k=3), _kept(0.30, 0.20, 0.15)),
        # Cumulative mass before 0.10 is 0.65 < 0.7, before 0.08 it is 0.75 >= 0.7.
        (SamplingParams(top_p=0.7), _kept(0.30, 0.20, 0.15, 0.10)),
        (SamplingParams(top_p=0.8), _kept(0.30, 0.20, 0.15, 0.10, 0.08)),
        # top-p acts on the top-k renormalised distribution: 0.08 / 0.9 starts after 0.833 >= 0.8.
        (SamplingParams(top_k=6, top_p=0.8), _kept(0.30, 0.20, 0.15, 0.10)),
        # min_p 0.25 of the max 0.30 is 0.075.
        (SamplingParams(min_p=0.25), _kept(0.30, 0.20, 0.15, 0.10, 0.08)),
        # Temperature 0.5 squares the probabilities before truncation.
        (SamplingParams(temperature=0.5, top_k=4), _kept(0.30, 0.20, 0.15, 0.10)),
        (SamplingParams(), list(range(10))),
    ],
    ids=["top_k", "top_p", "top_p2", "top_k+top_p", "min_p", "temperature+top_k", "plain"],
)
@pytest.mark.parametrize("seeded", [False, True], ids=["shared-noise", "seeded"])
def test_truncated_distribution(params: SamplingParams, kept: list[int], seeded: bool) -> None:
    torch.manual_seed(1)
    logits = PROBS.log().expand(NUM_DRAWS, -1).contiguous()  # [N, V]
    generators = [make_generator(1000 + i) if seeded else None for i in range(NUM_DRAWS)]
    rows = [_row(params, generator=g) for g in generators]
    tokens = torch.tensor(sampler(logits, rows).token_ids)
    counts = torch.bincount(tokens, minlength=len(PROBS)).double()

    outside = [t for t in range(len(PROBS)) if t not in kept]
    assert counts[outside].sum() == 0, f"sampled outside the allowed set {kept}: {counts.tolist()}"

    expected = PROBS[kept].double() ** (1.0 / params.temperature)
    expected = expected / expected.sum() * NUM_DRAWS
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    # 35 is beyond the 1e-4 tail of chi-square for up to 9 degrees of freedom.
    assert chi2 < 35.0, f"chi2 {chi2:.1f}: counts {counts[kept].tolist()} vs {expected.tolist()}"


# ---------------------------------------------------------------------------------------
# Penalties


def test_penalties_match_formula() -> None:
    base = torch.tensor([2.0, -1.0, 0.5, -0.5, 3.0, 0.0])
    params = SamplingParams(
        temperature=0,
        repetition_penalty=2.0,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        logprobs=6,
    )
    prompt, output = [0, 1], [1, 2, 2, 3]
    # repetition over prompt+output {0,1,2,3}: positive / 2, negative * 2;
    # then per output token: - 0.25 * count - 0.5 * present.
    expected = torch.tensor([
        2.0 / 2,
        -1.0 * 2 - 0.25 * 1 - 0.5,
        0.5 / 2 - 0.25 * 2 - 0.5,
        -0.5 * 2 - 0.25 * 1 - 0.5,
        3.0,
        0.0,
    ])
    neutral = SamplingParams(temperature=0, logprobs=6)
    logits = torch.stack([base, base])  # [2, V]
    before = logits.clone()
    rows = [_row(neutral, prompt_ids=prompt, output_ids=output),
            _row(params, prompt_ids=prompt, output_ids=output)]
    out = sampler(logits, rows)
    assert torch.equal(logits, before), "sampler must not modify the caller's logits"

    def full_logprobs(top: list[tuple[int, float]]) -> torch.Tensor:
        values = torch.empty(len(top))
        for token, value in top:
            values[token] = value
        return values

    assert out.top_logprobs is not None
    torch.testing.assert_close(full_logprobs(out.top_logprobs[0]), torch.log_softmax(base, -1))
    torch.testing.assert_close(full_logprobs(out.top_logprobs[1]), torch.log_softmax(expected, -1))


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    # Token 0 only in the prompt: repetition applies, presence/frequency do not.
    def pick(prompt_ids: list[int], output_ids: list[int], **penalty: float) -> int:
        params = SamplingParams(temperature=0, **penalty)
        row = _row(params, prompt_ids=prompt_ids, output_ids=output_ids)
        return sampler(logits, [row]).token_ids[0]

    assert pick([0], [], repetition_penalty=1.5) == 1
    assert pick([0], [], presence_penalty=2.0) == 0
    assert pick([0], [], frequency_penalty=2.0) == 0
    assert pick([], [0], frequency_penalty=0.2) == 1
    # A negative presence penalty rewards a used token.
    assert pick([], [1], presence_penalty=-0.5) == 1


def test_penalty_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="out of range"):
        sampler(torch.zeros(1, 4), [_row(SamplingParams(frequency_penalty=1.0), output_ids=[4])])


# ---------------------------------------------------------------------------------------
# min_tokens


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    eos, stop = 2, 5
    logits = torch.zeros(1, 8)
    logits[0, eos], logits[0, stop], logits[0, 7] = 10.0, 9.0, 8.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop, 99])  # 99: outside V
    def pick(num_outputs: int) -> int:
        row = _row(params, output_ids=[1] * num_outputs, eos_id=eos)
        return sampler(logits, [row]).token_ids[0]

    assert [pick(n) for n in range(5)] == [7, 7, 7, eos, eos]

    # ignore_eos: eos never ends the sequence, so it is not masked; stop ids still are.
    ignore = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    assert sampler(logits, [_row(ignore, eos_id=eos)]).token_ids == [eos]
    logits_stop = torch.zeros(1, 8)
    logits_stop[0, stop], logits_stop[0, 7] = 10.0, 8.0
    assert sampler(logits_stop, [_row(ignore, eos_id=eos)]).token_ids == [7]


def test_min_tokens_masks_sampled_rows() -> None:
    torch.manual_seed(2)
    eos, stop = 2, 5
    logits = torch.zeros(500, 8)
    logits[:, eos] = logits[:, stop] = 3.0
    params = SamplingParams(min_tokens=2, stop_token_ids=[stop])
    early = sampler(logits, [_row(params, output_ids=[1], eos_id=eos)] * 500).token_ids
    late = sampler(logits, [_row(params, output_ids=[1, 1], eos_id=eos)] * 500).token_ids
    assert eos not in early and stop not in early
    assert eos in late and stop in late


# ---------------------------------------------------------------------------------------
# Seeds

VOCAB = 50
_model_gen = torch.Generator().manual_seed(123)
_TRANSITIONS = torch.randn(VOCAB, VOCAB, generator=_model_gen) * 2  # [V, V]
_POSITION = torch.randn(64, VOCAB, generator=_model_gen)  # [S, V]


def _fake_model(output_ids: list[int]) -> torch.Tensor:
    """[V] logits that depend only on the sequence itself, like a real model's."""
    last = output_ids[-1] if output_ids else 0
    return _TRANSITIONS[last] + _POSITION[len(output_ids)]


def _generate(batch: dict[str, SamplingParams], steps: int = 20) -> dict[str, list[int]]:
    """Run a batch through `steps` decode steps, keeping generators across steps like the engine."""
    generators = {name: make_generator(p.seed) for name, p in batch.items()}
    outputs: dict[str, list[int]] = {name: [] for name in batch}
    for _ in range(steps):
        logits = torch.stack([_fake_model(outputs[name]) for name in batch])  # [B, V]
        rows = [
            _row(p, prompt_ids=[3, 4], output_ids=outputs[name], generator=generators[name])
            for name, p in batch.items()
        ]
        result: SamplerOutput = sampler(logits, rows)
        for name, token in zip(batch, result.token_ids):
            outputs[name].append(token)
    return outputs


SEEDED_A = SamplingParams(seed=1234, temperature=0.9, top_p=0.95)
SEEDED_PLAIN = SamplingParams(seed=99)
OTHERS = {
    "seeded_top_k": SamplingParams(seed=7, top_k=5),
    "unseeded": SamplingParams(),
    "greedy_penalised": SamplingParams(temperature=0, repetition_penalty=1.3, logprobs=3),
    "unseeded_min_p": SamplingParams(min_p=0.1, presence_penalty=0.5, logprobs=20),
}


def test_same_seed_same_tokens_in_any_batch() -> None:
    torch.manual_seed(10)
    alone_a = _generate({"a": SEEDED_A})["a"]
    alone_plain = _generate({"plain": SEEDED_PLAIN})["plain"]
    assert len(set(alone_a)) > 3, "degenerate test: the sequence should vary"

    torch.manual_seed(11)
    mixed = _generate({"unseeded": OTHERS["unseeded"], "a": SEEDED_A,
                       "seeded_top_k": OTHERS["seeded_top_k"], "plain": SEEDED_PLAIN})
    torch.manual_seed(12)
    crowded = _generate({**OTHERS, "plain": SEEDED_PLAIN, "a": SEEDED_A})
    torch.manual_seed(13)
    # A twin with the same seed sits beside it: each has its own generator, so both match.
    twins = _generate({"plain": SEEDED_PLAIN, "a": SEEDED_A, "a_twin": SEEDED_A.model_copy()})

    for batch in (mixed, crowded, twins):
        assert batch["a"] == alone_a
        assert batch["plain"] == alone_plain
    assert twins["a_twin"] == alone_a


def test_different_seeds_differ() -> None:
    out = _generate({"a": SEEDED_A, "b": SEEDED_A.model_copy(update={"seed": 1235})})
    assert out["a"] != out["b"]


# ---------------------------------------------------------------------------------------
# Logprobs


def test_logprobs_values_and_top_lists() -> None:
    torch.manual_seed(3)
    logits = torch.randn(5, 100) * 3
    params = [
        SamplingParams(logprobs=0),
        # Temperature and top-k do not touch the reported logprobs.
        SamplingParams(logprobs=5, temperature=0.3, top_k=10),
        SamplingParams(logprobs=MAX_LOGPROBS, seed=4),
        SamplingParams(),  # did not ask
        SamplingParams(temperature=0, logprobs=1),
    ]
    out = sampler(logits, [_row(p, generator=make_generator(p.seed)) for p in params])
    reference = torch.log_softmax(logits, dim=-1)  # [B, V]
    assert out.logprobs is not None and out.top_logprobs is not None

    expected = reference.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), expected)
    assert [len(t) for t in out.top_logprobs] == [0, 5, MAX_LOGPROBS, 0, 1]
    for i, top in enumerate(out.top_logprobs):
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for token, value in top:
            assert math.isclose(value, reference[i, token].item(), rel_tol=1e-5, abs_tol=1e-6)
        if top:
            assert top[0][0] == int(logits[i].argmax())
    assert out.token_ids[4] == out.top_logprobs[4][0][0]  # greedy row samples its top logprob


def test_logprobs_reflect_min_tokens_mask() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    out = sampler(logits, [_row(SamplingParams(temperature=0, min_tokens=1, logprobs=3), eos_id=0)])
    assert out.token_ids == [1]
    assert out.top_logprobs is not None and out.top_logprobs[0][-1] == (0, float("-inf"))
