"""Pass registry, ordered stages, per-pass history, a snapshot per stage and a graph lint after each pass.

A pass is a function ``fn(program, config) -> PassResult`` registered with :func:`register`, with a
typed config dataclass and a one-line doc (its docstring's first line, listed by ``lcc passes``).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LccError
from .ops import ATTENTION_OPS
from .snapshot import attribute, snapshot


class Stage(str, enum.Enum):
    CAPTURE = "capture"
    CANONICALIZE = "canonicalize"
    FORM = "form"
    LOWER = "lower"


@dataclass
class NoConfig:
    """A pass without options."""


@dataclass
class PassResult:
    matches: int
    notes: list[str] = field(default_factory=list)


@dataclass
class PassSpec:
    name: str
    stage: Stage
    fn: Callable[[Program, Any], PassResult]
    config_cls: type
    doc: str


@dataclass
class PassRecord:
    """One entry of the history: what a pass did and how long it took."""

    name: str
    stage: str
    config: dict[str, Any]
    matches: int
    added: int
    removed: int
    seconds: float
    notes: list[str]
    changes: dict[str, list[str]] = field(default_factory=dict)  # node ids added / removed / rewired, for lcc diff


PASSES: dict[str, PassSpec] = {}


def register(name: str, stage: Stage, config: type = NoConfig):
    """Register ``fn`` as pass ``name`` of ``stage`` with config dataclass ``config``."""

    def wrap(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        PASSES[name] = PassSpec(name, stage, fn, config, doc)
        return fn

    return wrap


@dataclass
class Program:
    """A program under compilation: the exported program plus everything the passes record about it."""

    ep: torch.export.ExportedProgram
    signature: dict[str, Any]
    source: dict[str, Any]
    model_config: Any = None
    form: str = "dense"
    target: str = "cpu"
    history: list[PassRecord] = field(default_factory=list)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.ep.graph_module

    def attention_nodes(self) -> list[torch.fx.Node]:
        """The attention sites in graph order: canonical ``longctx::attention`` or a lowered variant."""
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target in ATTENTION_OPS]

    def sites(self) -> list[dict[str, Any]]:
        """The per-site facts of every canonical attention, in graph order."""
        return [dict(n.meta["lcc"], node=n.name) for n in self.attention_nodes()]

    def add_parameter(self, target: str, value: torch.Tensor) -> torch.fx.Node:
        """A new trainable parameter ``target`` (a dotted module path) of the program, and its graph input.

        Lifted parameters are the first inputs of an exported graph: the new one goes after the last
        of them, in the graph and in the signature, and its value joins the state dict; its name joins the
        signature's ``new_parameters``.
        """
        from torch._guards import detect_fake_mode
        from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

        specs = self.ep.graph_signature.input_specs
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        last = max(i for i, spec in enumerate(specs) if spec.kind == InputKind.PARAMETER)
        with self.gm.graph.inserting_after(placeholders[last]):
            node = self.gm.graph.placeholder("p_" + target.replace(".", "_"))
        fake_mode = detect_fake_mode([n.meta["val"] for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)])
        node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)  # weight shapes are fixed, never symbols
        specs.insert(last + 1, InputSpec(kind=InputKind.PARAMETER, arg=TensorArgument(name=node.name), target=target, persistent=None))
        self.ep.state_dict[target] = torch.nn.Parameter(value)
        self.signature.setdefault("new_parameters", []).append(target)  # what ``lcc train --trainable new`` trains
        return node


def lint(program: Program) -> None:
    """Structural checks after each pass: a valid FX graph and facts on every canonical attention."""
    program.gm.graph.lint()
    for node in program.attention_nodes():
        if "lcc" not in node.meta or "val" not in node.meta:
            raise AssertionError(f"canonical attention {node.name} lacks its 'lcc' facts or 'val' metadata")
    program.gm.recompile()


def run_pass(program: Program, name: str, config: Any = None) -> PassRecord:
    """Run one registered pass, lint the graph, and append its record to the history."""
    spec = PASSES[name]
    config = config if config is not None else spec.config_cls()
    before = {n.name: (n.target, [a.name for a in n.all_input_nodes]) for n in program.gm.graph.nodes}
    start = time.perf_counter()
    result = spec.fn(program, config)
    seconds = time.perf_counter() - start
    after = {n.name: (n.target, [a.name for a in n.all_input_nodes]) for n in program.gm.graph.nodes}
    where = inspect.getsourcefile(spec.fn) or ""
    parameters = {s.arg.name: s.target for s in program.ep.graph_signature.input_specs if s.target is not None}
    attribute(program.gm, set(after) - set(before), parameters, by=f"lcc pass {name} ({where.rpartition('longctx_compile/')[2]})")
    lint(program)
    record = PassRecord(
        name=name,
        stage=spec.stage.value,
        config=dataclasses.asdict(config),
        matches=result.matches,
        added=len(set(after) - set(before)),
        removed=len(set(before) - set(after)),
        seconds=round(seconds, 4),
        notes=result.notes,
        changes={
            "added": [n for n in after if n not in before],
            "removed": [n for n in before if n not in after],
            "rewired": [n for n, op_inputs in after.items() if n in before and before[n] != op_inputs],  # other inputs or op
        },
    )
    program.history.append(record)
    return record


def run_stage(program: Program, stage: Stage, passes: list[tuple[str, Any]]) -> None:
    """Run a stage's passes in order, then keep a snapshot of the graph as it leaves the stage."""
    for name, config in passes:
        if name not in PASSES:
            raise LccError(f"unknown pass '{name}'")
        if PASSES[name].stage is not stage:
            raise AssertionError(f"pass '{name}' belongs to stage {PASSES[name].stage.value}, not {stage.value}")
        run_pass(program, name, config)
    program.snapshots[stage.value] = snapshot(program.gm)
