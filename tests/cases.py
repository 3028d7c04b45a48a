"""One id scheme for parametrized tests: ``{peer}-{layout}-{dtype}-{convention}-{detail}``.

A conformance table reads row by row: each row says which peer it checks against, in which layout
(``nc``, ``ncl``, ``nlc``, ``nchw``, ``nhwc``, ``ncdhw``, ``ndhwc``), dtype and moving-statistics
convention, then anything else that varies (momentum, path, mode). Only the parts that vary in a
table are given, and always in this order, so ``pytest -k nhwc`` or ``-k float64`` selects across
files alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

ID_PARTS = ("peer", "layout", "dtype", "convention", "detail")


def case_id(
    *,
    peer: str | None = None,
    layout: str | None = None,
    dtype: str | None = None,
    convention: str | None = None,
    detail: str | None = None,
) -> str:
    """The id of one row: the given parts joined by ``-`` in ID_PARTS order (layouts in lower case)."""
    parts = {"peer": peer, "layout": layout and layout.lower(), "dtype": dtype, "convention": convention}
    parts["detail"] = detail
    named = [str(parts[key]) for key in ID_PARTS if parts[key] is not None]
    if not named:
        raise ValueError(f"a case id needs at least one of {', '.join(ID_PARTS)}")
    return "-".join(named)


def case(*values: object, marks: Sequence[pytest.MarkDecorator] | pytest.MarkDecorator = (), **parts: str | None):
    """``pytest.param(*values)`` with the id ``case_id(**parts)`` builds (peer, layout, dtype, convention, detail)."""
    return pytest.param(*values, id=case_id(**parts), marks=marks)


def momentum_id(momentum: float | None) -> str:
    """``momentum0.1``; ``momentumNone`` for PyTorch's cumulative average."""
    return f"momentum{momentum}"
