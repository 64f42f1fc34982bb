"""fdp.random: counter-based keys (Philox-4x32-10), samplers, the key context, row counters."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import fdp
import fdp.random as R
from fdp._philox import _philox
from tests.helpers import assert_unchanged, snapshot

# Random123's kat_vectors for philox4x32 10: counter words, key words, expected output.
_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _words(*values: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(v, dtype=torch.int64) for v in values)


@pytest.mark.parametrize(("counter", "key", "expected"), _KAT)
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    out = _philox(_words(*counter), _words(*key))
    assert [int(o) for o in out] == list(expected)


def test_the_stream_is_philox_of_block_and_counter():
    k = torch.tensor([0xA4093822, 0x299F31D0])
    counter = 0x03707344_13198A2E
    words = R.bits(k, 8, counter=counter)
    second = _philox(_words(1, 0, 0x13198A2E, 0x03707344), _words(0xA4093822, 0x299F31D0))
    assert words[4:].tolist() == [int(o) for o in second]
    assert int(words.min()) >= 0 and int(words.max()) < 2**32


# --- keys -------------------------------------------------------------------------------------

def test_key_holds_the_seed_words_modulo_2_64():
    assert R.key(0).tolist() == [0, 0]
    assert R.key(2**32 + 5).tolist() == [5, 1]
    assert torch.equal(R.key(-1), R.key(2**64 - 1))
    assert R.key(3).dtype == torch.int64 and R.key(3).shape == (2,)


@given(seed=st.integers(0, 2**64 - 1), other=st.integers(0, 2**64 - 1))
def test_a_key_reproduces_its_draws_and_other_keys_differ(seed, other):
    a, b = R.uniform(R.key(seed), 16), R.uniform(R.key(seed), 16)
    assert torch.equal(a, b)
    if other != seed:
        assert not torch.equal(a, R.uniform(R.key(other), 16))


def test_split_and_fold_in_give_distinct_keys_unrelated_to_the_samples():
    k = R.key(0)
    keys = R.split(k, 100)
    folded = torch.stack([R.fold_in(k, i) for i in range(100)])
    everything = {tuple(x.tolist()) for x in [*keys, *folded, k]}
    assert len(everything) == 201
    assert torch.equal(R.split(k, 5), keys[:5])  # a prefix does not depend on n
    assert torch.equal(R.fold_in(k, torch.tensor(7)), R.fold_in(k, 7))
    assert torch.equal(R.fold_in(k, -1), R.fold_in(k, 2**64 - 1))
    samples = set(R.bits(k, 400).tolist())
    assert not samples & {int(w) for w in keys.flatten()}


@given(shape=st.lists(st.integers(0, 5), max_size=3), extra=st.integers(0, 9),
       counters=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=4))
def test_entries_depend_only_on_key_counter_and_position(shape, extra, counters):
    k = R.key(1)
    c = torch.tensor(counters)
    together = R.bits(k, shape, counter=c)
    assert together.shape == (len(counters), *shape)
    for i, ci in enumerate(counters):
        assert torch.equal(together[i], R.bits(k, shape, counter=ci))
    n = math.prod(shape)
    longer = R.bits(k, n + extra, counter=counters[0])
    assert torch.equal(longer[:n].reshape(shape), together[0])


# --- statistics (fixed keys, so deterministic; bounds are 5 standard deviations) --------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_uniform_is_uniform(dtype):
    n = 50_000
    u = R.uniform(R.key(11), n, dtype=dtype)
    assert u.dtype == dtype and bool(((u >= 0) & (u < 1)).all())
    u = u.double()
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # var of (U-1/2)^2
    counts = torch.histc(u, bins=32, min=0, max=1)  # 32 bins: aligned with bfloat16's grid
    chi2 = ((counts - n / 32) ** 2 / (n / 32)).sum().item()
    assert stats.chi2.sf(chi2, 31) > 1e-4
    if dtype in (torch.float32, torch.float64):  # half types are too coarse for a KS test
        assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4


def test_float64_uniforms_use_53_random_bits():
    u = R.uniform(R.key(2), 4096, dtype=torch.float64)
    ints = (u * 2.0**53).to(torch.int64)
    assert torch.equal(ints.double() * 2.0**-53, u)
    assert (ints & 1).sum().item() > 1500  # the lowest bit is random, not always 0


def test_bits_are_balanced_and_uncorrelated():
    n = 40_000
    w = R.bits(R.key(5), n)
    per_bit = torch.stack([(w >> b) & 1 for b in range(32)]).double().mean(1)
    assert (per_bit - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(n)
    u = R.uniform(R.key(5), (2, n), dtype=torch.float64)
    rows = R.uniform(R.key(5), n, counter=torch.tensor([[0], [1]]), dtype=torch.float64)
    keys = torch.stack([R.uniform(k, n, dtype=torch.float64) for k in R.split(R.key(5), 2)])
    bound = 5 / math.sqrt(n)
    for a, b in [(u[0, :-1], u[0, 1:]), (u[0], u[1]), (rows[0, 0], rows[1, 0]),
                 (keys[0], keys[1])]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < bound


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.7, 0.95, 1.0])
def test_bernoulli_rate_within_the_binomial_std(p):
    n = 40_000
    draws = R.bernoulli(R.key(9), p, n)
    assert draws.dtype == torch.bool
    std = math.sqrt(p * (1 - p) / n)
    assert abs(draws.double().mean().item() - p) <= 5 * std + 1e-12


def test_bernoulli_with_a_tensor_probability_broadcasts():
    p = torch.tensor([[0.0], [0.5], [1.0]])
    draws = R.bernoulli(R.key(0), p, 1000, counter=torch.arange(3))
    assert draws.shape == (3, 1000)
    assert not draws[0].any() and draws[2].all()
    assert torch.equal(draws[1], R.bernoulli(R.key(0), 0.5, 1000, counter=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_is_standard_normal(dtype):
    n = 50_000
    z = R.normal(R.key(4), n, dtype=dtype)
    assert z.dtype == dtype and bool(z.isfinite().all())
    z = z.double()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


# --- transforms ------------------------------------------------------------------------------

def test_vmap_over_keys_counters_and_data_matches_the_loop():
    keys = R.split(R.key(0), 3)
    vmap = torch.func.vmap
    assert torch.equal(vmap(lambda k: R.uniform(k, (2, 4)))(keys),
                       torch.stack([R.uniform(k, (2, 4)) for k in keys]))
    assert torch.equal(vmap(lambda k: R.split(k, 2))(keys), torch.stack([R.split(k, 2)
                                                                         for k in keys]))
    k, c = R.key(1), torch.arange(5) * 1000
    assert torch.equal(vmap(lambda ci: R.bits(k, 6, counter=ci))(c), R.bits(k, 6, counter=c))
    assert torch.equal(vmap(lambda d: R.fold_in(k, d))(c),
                       torch.stack([R.fold_in(k, int(d)) for d in c]))
    both = vmap(lambda kk, ci: R.bernoulli(kk, 0.3, 7, counter=ci))(keys, c[:3])
    assert torch.equal(both[2], R.bernoulli(keys[2], 0.3, 7, counter=c[2]))


def test_compiled_sampling_gives_the_eager_numbers():
    def draw(k: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k2 = R.fold_in(k, 3)
        return (R.uniform(k2, (2, 3), counter=c, dtype=torch.float64),
                R.bernoulli(k2, 0.3, 5, counter=c))

    k, c = R.key(8), torch.tensor([0, 5, 2**40])
    compiled = torch.compile(draw, fullgraph=True, dynamic=False)
    for key in (k, R.key(9)):  # a new key reuses the graph
        for e, got in zip(draw(key, c), compiled(key, c), strict=True):
            assert torch.equal(e, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_cpu_bits_eagerly_and_compiled():
    def draw(k: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k2 = R.fold_in(R.split(k, 3)[2], 5)
        return (R.bits(k2, 7, counter=c), R.uniform(k2, 5, counter=c, dtype=torch.float64),
                R.uniform(k2, 5), R.bernoulli(k2, 0.3, 9, counter=c))

    c = torch.tensor([0, 3, 2**40, -1])
    cpu = draw(R.key(12), c)
    for fn in (draw, torch.compile(draw, fullgraph=True)):  # eager CUDA, then Triton
        for e, got in zip(cpu, fn(R.key(12, device="cuda"), c.cuda()), strict=True):
            assert torch.equal(got.cpu(), e)
    z = R.normal(R.key(12, device="cuda"), 1000, dtype=torch.float64).cpu()
    torch.testing.assert_close(z, R.normal(R.key(12), 1000, dtype=torch.float64))


# --- key context and row counters ------------------------------------------------------------

def test_the_context_hands_out_one_key_per_call_and_restarts_on_entry():
    k = R.key(3)
    for _ in range(2):
        with R.key_context(k):
            got = [R.next_key() for _ in range(3)]
        assert all(torch.equal(g, R.fold_in(k, i)) for i, g in enumerate(got))
    with R.key_context(k):
        outer = R.next_key()
        with R.key_context(R.key(4)):
            inner = R.next_key()
        after = R.next_key()
    assert torch.equal(inner, R.fold_in(R.key(4), 0))
    assert torch.equal(outer, R.fold_in(k, 0)) and torch.equal(after, R.fold_in(k, 1))


def test_the_context_is_thread_local_and_missing_keys_say_how_to_bind_one():
    errors = []

    def other_thread() -> None:
        try:
            R.next_key("fdp.nn.Dropout")
        except RuntimeError as e:
            errors.append(str(e))

    with R.key_context(R.key(0)):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1
    assert "fdp.nn.Dropout needs a random key" in errors[0]
    assert "fdp.random.key_context" in errors[0] and "with_key" in errors[0]
    with pytest.raises(RuntimeError, match="needs a random key"):
        R.next_key()


def test_with_key_binds_the_last_argument():
    seen = []
    f = R.with_key(lambda a, b=0: seen.append((a, b, R.next_key())) or a)
    assert f(1, R.key(2), b=5) == 1
    assert seen[0][:2] == (1, 5) and torch.equal(seen[0][2], R.fold_in(R.key(2), 0))
    with pytest.raises(TypeError, match="last positional argument"):
        f()
    with pytest.raises(TypeError, match="must be callable"):
        R.with_key(3)


@given(n=st.integers(1, 6), b=st.integers(1, 20), split=st.sampled_from(["chunk", "even"]))
def test_row_index_is_the_row_in_the_full_batch(n, b, split):
    mesh = fdp.Mesh(n)
    x = torch.arange(b)
    rows = fdp.pmap(lambda s: R.row_index(s.shape[0]), mesh)(fdp.scatter(x, mesh, split=split))
    assert torch.equal(fdp.gather(rows, mesh), x)


def test_row_index_outside_pmap_on_unsplit_inputs_and_with_a_row_offset():
    assert torch.equal(R.row_index(3), torch.arange(3))
    stacked = fdp.pmap(lambda s: R.row_index(2), fdp.Mesh(3))(torch.zeros(3, 2))
    assert torch.equal(stacked, torch.arange(6).view(3, 2))
    with R.key_context(R.key(0), row_offset=10):
        assert torch.equal(R.row_index(2), torch.tensor([10, 11]))
    named = fdp.pmap(lambda s: R.row_index(1, "batch"), fdp.Mesh(2), axis_name="batch")
    assert torch.equal(named(torch.zeros(2, 1)), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="unknown axis name 'dp'"):
        fdp.pmap(lambda s: R.row_index(1, "dp"), fdp.Mesh(2), axis_name="batch")(
            torch.zeros(2, 1))


# --- purity and bad input --------------------------------------------------------------------

def test_nothing_is_modified():
    k, c, d = R.key(0), torch.arange(4), torch.tensor(3)
    before = snapshot((k, c, d))
    R.uniform(k, 3, counter=c)
    R.normal(k, 3, counter=c)
    R.bernoulli(k, 0.5, 3, counter=c)
    R.split(k, 3)
    R.fold_in(k, d)
    with R.key_context(k):
        R.next_key()
    assert_unchanged(before, (k, c, d))


@pytest.mark.parametrize(("seed", "error", "match"), [
    (1.5, TypeError, "seed must be an int"), (True, TypeError, "seed must be an int"),
    ("1", TypeError, "seed must be an int"), (2**64, ValueError, "out of range"),
    (-(2**63) - 1, ValueError, "out of range"),
])
def test_bad_seeds(seed, error, match):
    with pytest.raises(error, match=match):
        R.key(seed)


@pytest.mark.parametrize(("k", "error", "match"), [
    ([0, 0], TypeError, "key must be a tensor"),
    (torch.zeros(2), ValueError, r"int64 tensor of shape \(2,\).*float32\[2\]"),
    (torch.zeros(3, dtype=torch.int64), ValueError, r"got torch.int64\[3\]"),
    (torch.zeros(4, 2, dtype=torch.int64), ValueError, "torch.func.vmap"),
])
def test_bad_keys(k, error, match):
    for call in (lambda: R.uniform(k, 2), lambda: R.split(k), lambda: R.fold_in(k, 1),
                 lambda: R.key_context(k).__enter__()):
        with pytest.raises(error, match=match):
            call()


def test_bad_arguments_name_the_argument():
    k = R.key(0)
    with pytest.raises(TypeError, match="shape must be an int or a sequence"):
        R.uniform(k, (2, -1))
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        R.uniform(k, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"p must be a probability in \[0, 1\]"):
        R.bernoulli(k, 1.5, 2)
    with pytest.raises(TypeError, match="counter must be an int or an integer tensor"):
        R.bits(k, 2, counter=torch.tensor([0.5]))
    with pytest.raises(TypeError, match="data must be an int"):
        R.fold_in(k, 1.0)
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        R.split(k, -1)
    with pytest.raises(ValueError, match="row_offset must be an int >= 0"):
        R.key_context(k, row_offset=-1).__enter__()
    with pytest.raises(ValueError, match="rows must be an int >= 0"):
        R.row_index(-2)
