"""Patterns: each mask against an independent double-loop statement of its rule; block layouts
against the generic mask pooling; densities against the mask mean; token permutation; errors."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnlab as al
from attnlab.core.patterns import Permuted, inverse_permutation
from attnlab.core.patterns.base import _blocks_from_mask_rows
from attnlab.core.patterns.block_sparse import random_causal_layout
from attnlab.core.patterns.intervals import IntervalPattern

FAST = settings(max_examples=40, deadline=None)


# ---- the rules, restated as plain Python loops ---------------------------------------------------
def loop_mask(n_q, n_kv, allowed) -> torch.Tensor:
    return torch.tensor([[bool(allowed(i, j)) for j in range(n_kv)] for i in range(n_q)], dtype=torch.bool).view(n_q, n_kv)


def sliding_rule(size, causal, n_q, n_kv):
    def allowed(i, j):
        pos = i + n_kv - n_q
        if causal:
            return pos - size < j <= pos
        return -(size // 2) <= j - pos <= (size - 1) // 2

    return allowed


def prefix_rule(prefix, n_q, n_kv):
    return lambda i, j: j < prefix or j <= i + n_kv - n_q


def document_rule(lengths):
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    return lambda i, j: doc[i] == doc[j]


def block_sparse_rule(layout, bs):
    return lambda i, j: bool(layout[i // bs][j // bs])


def na_axis(size, k, d, s, causal):
    """NATTEN's per-axis rule, written with its window *centre* (the code clamps the start)."""

    def allowed(x, y):
        if x % d != y % d:
            return False
        n = len(range(x % d, size, d))  # length of this dilation group
        c, cy = x // d, y // d
        if causal:
            leader = min(c - c % s + s - 1, n - 1)
            return cy <= c and leader - cy < k
        leader = min(c - c % s + s // 2, n - 1)
        left, right = k // 2, k // 2 - (1 - k % 2)
        centre = min(max(leader, left), n - 1 - right)
        return centre - left <= cy <= centre + right

    return allowed


def halo_axis(block, halo):
    def allowed(x, y):
        b = x // block
        return b * block - halo <= y < (b + 1) * block + halo

    return allowed


def grid_rule(shape, axis_rules):
    coords = list(itertools.product(*(range(n) for n in shape)))  # row-major
    return lambda i, j: all(rule(coords[i][a], coords[j][a]) for a, rule in enumerate(axis_rules))


# ---- hypothesis strategies ----------------------------------------------------------------------
lengths = st.integers(1, 33)


@st.composite
def neighborhood_case(draw, max_side=7):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, max_side if ndim > 1 else 24)) for _ in range(ndim))
    kernel = tuple(draw(st.integers(1, n)) for n in shape)
    dilation = tuple(draw(st.integers(1, n // k)) for n, k in zip(shape, kernel))
    stride = tuple(draw(st.integers(1, k)) for k in kernel)
    causal = tuple(draw(st.booleans()) for _ in shape)
    tile = tuple(draw(st.integers(1, 4)) for _ in shape)
    p = al.neighborhood(shape, kernel, dilation, stride, causal, tile_shape=tile)
    rule = grid_rule(shape, [na_axis(*a) for a in zip(shape, kernel, dilation, stride, causal)])
    return p, math.prod(shape), rule


@st.composite
def blocked_case(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 7 if ndim > 1 else 24)) for _ in range(ndim))
    block = tuple(draw(st.integers(1, n)) for n in shape)
    halo = tuple(draw(st.integers(0, 3)) for _ in shape)
    p = al.blocked(shape, block, halo, tile_shape=tuple(draw(st.integers(1, 4)) for _ in shape))
    return p, math.prod(shape), grid_rule(shape, [halo_axis(b, h) for b, h in zip(block, halo)])


@st.composite
def any_case(draw):
    """(pattern, n_q, n_kv, loop rule) for every pattern kind, cross attention where allowed."""
    kind = draw(st.sampled_from(["sliding", "prefix", "document", "block_sparse", "causal", "neighborhood", "blocked"]))
    n_q, n_kv = draw(lengths), draw(lengths)
    if kind == "sliding":
        size, causal = draw(st.integers(1, 12)), draw(st.booleans())
        return al.sliding_window(size, causal), n_q, n_kv, sliding_rule(size, causal, n_q, n_kv)
    if kind == "prefix":
        prefix = draw(st.integers(0, 40))
        return al.prefix_lm(prefix), n_q, n_kv, prefix_rule(prefix, n_q, n_kv)
    if kind == "document":
        docs = draw(st.lists(st.integers(1, 9), min_size=1, max_size=6))
        return al.document(docs), sum(docs), sum(docs), document_rule(docs)
    if kind == "block_sparse":
        bs = draw(st.integers(1, 8))
        rows, cols = -(-n_q // bs), -(-n_kv // bs)
        layout = [[draw(st.booleans()) for _ in range(cols)] for _ in range(rows)]
        return al.block_sparse(layout, bs), n_q, n_kv, block_sparse_rule(layout, bs)
    if kind == "causal":
        return al.causal(), n_q, n_kv, lambda i, j: j <= i + n_kv - n_q
    p, n, rule = draw(neighborhood_case() if kind == "neighborhood" else blocked_case())
    return p, n, n, rule


# ---- the three views of one rule agree ----------------------------------------------------------
@FAST
@given(any_case())
def test_mask_equals_double_loop(case):
    p, n_q, n_kv, rule = case
    assert torch.equal(p.mask(n_q, n_kv), loop_mask(n_q, n_kv, rule)), repr(p)


@FAST
@given(any_case(), st.integers(1, 9), st.integers(1, 9))
def test_block_layout_equals_generic_and_density_equals_mean(case, q_block, kv_block):
    p, n_q, n_kv, _ = case
    want = _blocks_from_mask_rows(p, n_q, n_kv, q_block, kv_block)
    got = p.block_layout(n_q, n_kv, q_block, kv_block)
    assert torch.equal(got.full, want.full), repr(p)
    assert torch.equal(got.partial, want.partial), repr(p)
    assert p.density(n_q, n_kv) == pytest.approx(p.mask(n_q, n_kv).double().mean().item(), abs=1e-12)


@FAST
@given(st.data(), st.integers(1, 9), st.integers(1, 9))
def test_permuted_layout_equals_generic(data, q_block, kv_block):
    p, n, _ = data.draw(neighborhood_case() if data.draw(st.booleans()) else blocked_case())
    pp = p.permuted()
    want = _blocks_from_mask_rows(pp, n, n, q_block, kv_block)
    got = pp.block_layout(n, n, q_block, kv_block)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial), repr(pp)
    assert pp.density(n, n) == pytest.approx(pp.mask(n, n).double().mean().item(), abs=1e-12)


@FAST
@given(any_case(), any_case(), st.integers(1, 9), st.integers(1, 9))
def test_composite_layout_is_safe(case_a, case_b, q_block, kv_block):
    a, n_q, n_kv, _ = case_a
    b = case_b[0]
    try:
        b.mask(n_q, n_kv)
    except ValueError:
        b = al.sliding_window(3)  # lengths of case_b don't fit case_a's; any 1-D pattern will do
    for p in (a & b, a | b, ~a, ~(a & b)):
        want = _blocks_from_mask_rows(p, n_q, n_kv, q_block, kv_block)
        got = p.block_layout(n_q, n_kv, q_block, kv_block)
        assert not (got.full & ~want.full).any(), f"{p!r}: a tile called full is not"
        assert not ((want.full | want.partial) & ~(got.full | got.partial)).any(), f"{p!r}: touched tile missed"
        assert not (got.full & got.partial).any()
    assert (~a).density(n_q, n_kv) == pytest.approx((~a).mask(n_q, n_kv).double().mean().item(), abs=1e-12)


@st.composite
def interval_case(draw, n_q, n_kv):
    """A random 1-D window pattern for fixed lengths, with its loop rule."""
    kinds = ["sliding", "prefix", "causal"] + (["document"] if n_q == n_kv else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "sliding":
        size, causal = draw(st.integers(1, 12)), draw(st.booleans())
        return al.sliding_window(size, causal), sliding_rule(size, causal, n_q, n_kv)
    if kind == "prefix":
        prefix = draw(st.integers(0, 40))
        return al.prefix_lm(prefix), prefix_rule(prefix, n_q, n_kv)
    if kind == "causal":
        return al.causal(), lambda i, j: j <= i + n_kv - n_q
    cuts = sorted(draw(st.sets(st.integers(1, n_q - 1), max_size=4))) if n_q > 1 else []
    docs = [b - a for a, b in zip([0] + cuts, cuts + [n_q])]
    return al.document(docs), document_rule(docs)


@FAST
@given(st.data(), lengths, lengths, st.integers(1, 9), st.integers(1, 9))
def test_and_of_windows_is_exact(data, n_q, n_kv, q_block, kv_block):
    (a, rule_a), (b, rule_b) = data.draw(interval_case(n_q, n_kv)), data.draw(interval_case(n_q, n_kv))
    p = a & b
    assert torch.equal(p.mask(n_q, n_kv), loop_mask(n_q, n_kv, lambda i, j: rule_a(i, j) and rule_b(i, j)))
    want = _blocks_from_mask_rows(p, n_q, n_kv, q_block, kv_block)
    got = p.block_layout(n_q, n_kv, q_block, kv_block)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial), repr(p)
    assert p.density(n_q, n_kv) == pytest.approx(p.mask(n_q, n_kv).double().mean().item(), abs=1e-12)


@dataclass(frozen=True)
class Steps(IntervalPattern):
    """Test-only windows [2i, 2i + 1], emptied on every third row (empty rows inside the keys)."""

    def bounds(self, q, n_q, n_kv, device=None):
        return 2 * q, 2 * q + 1 - 2 * (q % 3 == 1).long()


@pytest.mark.parametrize("q_block, kv_block", [(1, 1), (2, 3), (3, 2), (4, 7)])
def test_window_layout_exact_with_empty_rows_inside(q_block, kv_block):
    p = Steps()
    assert (p.mask(20, 40).sum(1) == 0).sum() > 3
    want = _blocks_from_mask_rows(p, 20, 40, q_block, kv_block)
    got = p.block_layout(20, 40, q_block, kv_block)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial)


# ---- neighborhood and tile order ----------------------------------------------------------------
@FAST
@given(neighborhood_case())
def test_noncausal_neighborhood_sees_exactly_prod_kernel(case):
    p, n, _ = case
    if any(p.causal):
        p = al.neighborhood(p.shape, p.kernel_size, p.dilation, p.stride)
    assert (p.mask(n, n).sum(1) == math.prod(p.kernel_size)).all(), repr(p)


@FAST
@given(st.data())
def test_permuted_mask_is_original_under_order(data):
    p, n, _ = data.draw(neighborhood_case() if data.draw(st.booleans()) else blocked_case())
    order = p.token_order(n, n)
    if order is None:  # 1-D without dilation: row-major is already the tile order
        assert p.permuted() is p
        return
    assert torch.equal(torch.sort(order).values, torch.arange(n))
    inv = inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(n))
    assert torch.equal(p.permuted().mask(n, n), p.mask(n, n)[order][:, order])
    # What kernels do: run on permuted tokens, undo the order, get the row-major mask back.
    assert torch.equal(p.permuted().mask(n, n)[inv][:, inv], p.mask(n, n))


def test_tile_order_lays_out_whole_tiles():
    p = al.neighborhood((16, 32), 5)  # default tile 8x16 = 128 tokens
    order = p.token_order(512, 512)
    rows, cols = order[:128] // 32, order[:128] % 32
    assert rows.unique().tolist() == list(range(8)) and cols.unique().tolist() == list(range(16))


def test_permuted_2d_neighborhood_block_density_much_lower():
    p = al.neighborhood((128, 128), 33)
    n = 128 * 128
    row_major = p.block_layout(n, n).density
    permuted = p.permuted().block_layout(n, n).density
    assert permuted < 0.6 * row_major, (permuted, row_major)
    assert permuted < 2.5 * p.density(n, n)


@pytest.mark.parametrize(
    "p",
    [
        al.neighborhood((64, 64), (24, 48), stride=(8, 16)),  # window starts on tile edges
        al.neighborhood((64, 64), 16, stride=16),
        al.blocked((64, 64), (8, 16), 0),
    ],
)
def test_tile_aligned_patterns_are_perfectly_block_sparse(p):
    n = 64 * 64
    pp = p.permuted()
    got = pp.block_layout(n, n)
    assert not got.partial.any() and got.density == pytest.approx(p.density(n, n))
    want = _blocks_from_mask_rows(pp, n, n, 128, 128)
    assert torch.equal(got.full, want.full) and torch.equal(got.partial, want.partial)


def test_mask_mod_traces_under_flex_vmap():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    patterns = [
        (al.sliding_window(5, causal=True), 20, 24),
        (al.prefix_lm(3), 24, 20),
        (al.document([5, 9, 6]), 20, 20),
        (al.block_sparse(torch.rand(3, 4) < 0.5, 8), 20, 30),
        (al.neighborhood((4, 6), 3, dilation=(1, 2), stride=(2, 1), causal=(True, False)), 24, 24),
        (al.neighborhood((4, 6), 3).permuted(), 24, 24),
        (al.blocked((4, 6), 2, 1), 24, 24),
        (al.sliding_window(3) & al.document([10, 10]) | al.causal(), 20, 20),
        (~al.neighborhood((4, 5), 3) | al.causal(), 20, 20),
    ]
    for p, n_q, n_kv in patterns:
        got = flex.create_mask(p.mask_mod(n_q, n_kv, "cpu"), None, None, n_q, n_kv, device="cpu")
        assert torch.equal(got[0, 0], p.mask(n_q, n_kv)), repr(p)


# ---- repr, hashing, arguments -------------------------------------------------------------------
def test_repr_and_hash():
    assert repr(al.sliding_window(128, causal=True)) == "sliding_window(128, causal=True)"
    assert repr(al.sliding_window(7)) == "sliding_window(7)"
    assert repr(al.prefix_lm(4)) == "prefix_lm(4)"
    assert repr(al.document([2, 3])) == "document([2, 3])"
    assert repr(al.neighborhood((8, 8), 3, dilation=2)) == "neighborhood((8, 8), 3, dilation=2)"
    assert repr(al.neighborhood((8, 8), (3, 5), causal=(True, False))) == (
        "neighborhood((8, 8), (3, 5), causal=(True, False))"
    )
    assert repr(al.blocked((8, 8), 4, 1)) == "blocked((8, 8), block=4, halo=1)"
    assert repr(al.sliding_window(3) & al.causal()) == "(sliding_window(3) & causal())"
    assert repr(~al.causal() | al.prefix_lm(2)) == "(~causal() | prefix_lm(2))"
    equal_pairs = [
        (al.neighborhood((8, 8), 3), al.neighborhood([8, 8], (3, 3))),
        (al.block_sparse(torch.eye(2, dtype=torch.bool), 4), al.block_sparse([[True, False], [False, True]], 4)),
        (al.document(torch.tensor([2, 3])), al.document([2, 3])),
        (al.neighborhood((8, 8), 3).permuted(), al.neighborhood((8, 8), 3).permuted()),
    ]
    for a, b in equal_pairs:
        assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert al.sliding_window(3) != al.sliding_window(3, causal=True)
    assert isinstance(al.neighborhood((8, 8), 3).permuted(), Permuted)


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: al.neighborhood((8, 8), 9), "kernel_size"),
        (lambda: al.neighborhood((8, 8), 0), "kernel_size"),
        (lambda: al.neighborhood((8, 8), (3, 3, 3)), "kernel_size"),
        (lambda: al.neighborhood((8, 8), 3, dilation=0), "dilation"),
        (lambda: al.neighborhood((8, 8), 3, dilation=3), "dilation"),
        (lambda: al.neighborhood((8, 8), 3, stride=4), "stride"),
        (lambda: al.neighborhood((8, 8), 3, stride=0), "stride"),
        (lambda: al.neighborhood((8, 8), 3, causal=1), "causal"),
        (lambda: al.neighborhood((8, 0), 1), "shape"),
        (lambda: al.neighborhood((2, 2, 2, 2), 1), "shape"),
        (lambda: al.neighborhood((8, 8), 3, tile_shape=(0, 4)), "tile_shape"),
        (lambda: al.neighborhood((8, 8), 3).mask(63, 63), "prod(shape)"),
        (lambda: al.neighborhood((8, 8), 3).block_layout(64, 60), "prod(shape)"),
        (lambda: al.neighborhood((8, 8), 3).token_order(65, 65), "prod(shape)"),
        (lambda: al.neighborhood((8, 8), 3).density(64, 63), "prod(shape)"),
        (lambda: al.blocked((8, 8), 9, 1), "block"),
        (lambda: al.blocked((8, 8), 4, -1), "halo"),
        (lambda: al.blocked((8, 8), 4, 1).mask(60, 60), "prod(shape)"),
        (lambda: al.sliding_window(0), "size"),
        (lambda: al.sliding_window(2.5), "size"),
        (lambda: al.sliding_window(3, causal="yes"), "causal"),
        (lambda: al.prefix_lm(-1), "prefix_len"),
        (lambda: al.document([]), "lengths"),
        (lambda: al.document([3, 0]), "lengths"),
        (lambda: al.document([3, 4]).mask(6, 6), "sum(lengths)"),
        (lambda: al.block_sparse([[1, 0]], 4), "layout"),
        (lambda: al.block_sparse([[True]], 0), "block_size"),
        (lambda: al.block_sparse([[True, True]], 4).mask(4, 4), "need"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg.replace("(", r"\(").replace(")", r"\)")):
        make()


@pytest.mark.parametrize(
    "module",
    ["causal", "sliding_window", "prefix_lm", "document", "block_sparse", "neighborhood", "blocked", "permuted"],
)
def test_main_draws_the_mask(module, capsys):
    import importlib

    importlib.import_module(f"attnlab.core.patterns.{module}").main()
    out = capsys.readouterr().out
    assert "#" in out and "density=" in out


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), density=st.floats(0.01, 1.0), heads=st.integers(1, 3), seed=st.integers(0, 5))
def test_random_causal_layout_counts(n, density, heads, seed):
    lay = random_causal_layout(n, density, heads, seed=seed)
    rows = torch.arange(n)
    assert lay.shape == (heads, n, n) and lay.dtype == torch.bool
    assert not (lay & ~torch.ones(n, n, dtype=torch.bool).tril()).any()  # causal only
    assert lay[:, rows, rows].all()  # the diagonal always kept
    want = torch.ceil(density * (rows + 1).float()).long().clamp(min=1)
    assert torch.equal(lay.sum(-1), want.expand(heads, n))
    assert torch.equal(lay, random_causal_layout(n, density, heads, seed=seed))  # deterministic


def test_random_causal_layout_errors():
    with pytest.raises(ValueError, match="density"):
        random_causal_layout(4, 0.0)
    with pytest.raises(ValueError, match="n_blocks"):
        random_causal_layout(0, 0.5)
