"""Named access to a longctx op's arguments, by the names in its schema (never by position).

``Call.of(node)`` reads a graph node's arguments, ``Call(op, args)`` a call a runtime hook received;
``call.router_q`` or ``call["causal"]`` read one, ``call.replace(k=..., causal=False)`` changes some,
and ``call()`` runs the op (or ``call.run(other_op)`` runs another op with the arguments it shares).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch


@functools.cache
def arg_names(op: Any) -> tuple[str, ...]:
    """The argument names of ``op`` (an OpOverload) in schema order."""
    return tuple(a.name for a in op._schema.arguments)


@functools.cache
def _defaults(op: Any) -> tuple[Any, ...]:
    return tuple(a.default_value if a.has_default_value() else None for a in op._schema.arguments)


class Call:
    """One call of a longctx op: the op and its arguments, readable and replaceable by schema name."""

    __slots__ = ("op", "values")

    def __init__(self, op: Any, args: tuple | list = (), kwargs: dict[str, Any] | None = None):
        names = arg_names(op)
        if len(args) > len(names):
            raise TypeError(f"{op} takes {len(names)} arguments, got {len(args)}")
        values = dict(zip(names, _defaults(op), strict=True))
        values.update(zip(names, args, strict=False))
        if kwargs:
            unknown = set(kwargs) - set(names)
            if unknown:
                raise TypeError(f"{op} has no argument {sorted(unknown)[0]!r}")
            values.update(kwargs)
        self.op, self.values = op, values

    @classmethod
    def of(cls, node: torch.fx.Node) -> Call:
        """The arguments of a ``call_function`` node of a longctx op (fx Nodes and literals)."""
        return cls(node.target, node.args, node.kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"{self.op} has no argument {name!r}") from None

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def replace(self, **changes: Any) -> Call:
        """A copy with some arguments changed (each must be one of the op's)."""
        return Call(self.op, (), {**self.values, **changes})

    def to(self, op: Any, **extra: Any) -> Call:
        """A call of another op: the arguments it shares with this one by name, plus ``extra``."""
        names = arg_names(op)
        return Call(op, (), {**{k: v for k, v in self.values.items() if k in names}, **extra})

    def args(self, op: Any = None) -> tuple:
        """Positional arguments for ``op`` (default: this call's op), taken by name from this call."""
        return tuple(self.values[name] for name in arg_names(op or self.op))

    def run(self, op: Any = None) -> Any:
        """Run ``op`` (default: this call's op) with the arguments it shares with this call, by name."""
        op = op or self.op
        return op(*self.args(op))

    def __call__(self) -> Any:
        return self.op(*self.args())

    def __repr__(self) -> str:
        return f"Call({self.op}, {', '.join(self.values)})"
