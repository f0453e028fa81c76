"""Argument checks for pattern factories: each normalises one argument or raises ValueError naming it."""
from __future__ import annotations

from typing import Sequence, Tuple


def check_int(name: str, value, minimum: int) -> int:
    """An int (not bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {name}={value!r}")
    return value


def check_shape(shape) -> Tuple[int, ...]:
    """A token grid: 1 to 3 positive ints (an int means a 1-D grid)."""
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    ok = (
        isinstance(shape, Sequence)
        and 1 <= len(shape) <= 3
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in shape)
    )
    if not ok:
        raise ValueError(f"`shape` must be 1 to 3 positive integers (the token grid); got shape={shape!r}")
    return tuple(shape)


def per_axis(name: str, value, ndim: int, minimum: int) -> Tuple[int, ...]:
    """An int or a tuple of ``ndim`` ints, each >= minimum, as a tuple of ``ndim`` ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    ok = (
        isinstance(value, Sequence)
        and len(value) == ndim
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in value)
    )
    if not ok:
        raise ValueError(
            f"`{name}` must be an integer or a tuple of {ndim} integers (one per grid axis), all >= {minimum}; "
            f"got {name}={value!r}"
        )
    return tuple(value)


def per_axis_bool(name: str, value, ndim: int) -> Tuple[bool, ...]:
    """A bool or a tuple of ``ndim`` bools."""
    if isinstance(value, bool):
        return (value,) * ndim
    if isinstance(value, Sequence) and len(value) == ndim and all(isinstance(x, bool) for x in value):
        return tuple(value)
    raise ValueError(f"`{name}` must be a bool or a tuple of {ndim} bools (one per grid axis); got {name}={value!r}")


def check_grid_lengths(shape: Tuple[int, ...], n_q: int, n_kv: int) -> None:
    """Grid patterns are self-attention over prod(shape) tokens."""
    n = 1
    for x in shape:
        n *= x
    if n_q != n or n_kv != n:
        raise ValueError(
            f"this grid pattern needs n_q == n_kv == prod(shape) = {n} for shape={shape}; got {n_q=}, {n_kv=}"
        )
