"""The structure of an ONNX model: its graphs and subgraphs, their order, their tensors.

An upload is hostile until checked: a graph may be cyclic, nest subgraphs in
``If``/``Loop``/``Scan`` nodes, or hold millions of nodes. :func:`check_structure`
caps the size of the whole model and refuses any graph (or subgraph, or function
body) whose nodes have no topological order, so later walks of the graph end.
Nothing here imports torch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import onnx

from worker.engine.errors import TeacherInvalid

#: Nodes in one model, subgraphs and function bodies included. Exported LLMs have tens of
#: thousands; the cap bounds the time spent walking a graph.
MAX_GRAPH_NODES = 500_000
#: Initializers in one model, subgraphs included; exports hold at most a few thousand.
MAX_INITIALIZERS = 500_000
#: Nodes named in the message about a cycle.
_CYCLE_NODES_SHOWN = 8


@dataclass
class _Census:
    """Nodes and initializers seen so far, refused as soon as a cap is passed."""

    where: str
    nodes: int = 0
    initializers: int = 0

    def count(self, nodes: int, initializers: int = 0) -> None:
        self.nodes += nodes
        self.initializers += initializers
        if self.nodes > MAX_GRAPH_NODES:
            raise TeacherInvalid(
                f"{self.where}: the ONNX model has more than {MAX_GRAPH_NODES} nodes "
                "(subgraphs included)",
                field="teacher",
            )
        if self.initializers > MAX_INITIALIZERS:
            raise TeacherInvalid(
                f"{self.where}: the ONNX model has more than {MAX_INITIALIZERS} initializers "
                "(subgraphs included)",
                field="teacher",
            )


def check_structure(model: onnx.ModelProto, where: str) -> None:
    """Refuse a model over the size caps or with a cyclic graph, subgraph or function body.

    ``where`` names the file in messages. Raises :class:`TeacherInvalid`.
    """
    census = _Census(where)
    _outer_reads(model.graph, census)
    for function in model.functions:
        census.count(len(function.node))
        _ordered(function.node, [_node_reads(n, census) for n in function.node], where)


def topological_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where each value is produced before it is read.

    A node also reads what its subgraphs read from enclosing scopes. Raises
    :class:`TeacherInvalid` naming the nodes of a cycle.
    """
    census = _Census(graph.name or "graph")
    reads = [_node_reads(node, census) for node in graph.node]
    return [graph.node[i] for i in _ordered(graph.node, reads, census.where)]


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (``If`` branches, ``Loop``/``Scan`` bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def all_graphs(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph, every subgraph at any depth, and the subgraphs in function bodies."""
    stack = [model.graph]
    stack.extend(g for f in model.functions for n in f.node for g in subgraphs(n))
    while stack:
        graph = stack.pop()
        yield graph
        stack.extend(g for n in graph.node for g in subgraphs(n))


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the model holds: initializers and attribute tensors, subgraphs included."""
    for graph in all_graphs(model):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                yield from _attribute_tensors(attr)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                yield from _attribute_tensors(attr)


def _attribute_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    sparse = [attr.sparse_tensor] if attr.HasField("sparse_tensor") else []
    for s in [*sparse, *attr.sparse_tensors]:
        yield from (s.values, s.indices)


def _outer_reads(graph: onnx.GraphProto, census: _Census) -> set[str]:
    """Check ``graph`` and its subgraphs; returns the values it reads from enclosing scopes."""
    census.count(len(graph.node), len(graph.initializer) + len(graph.sparse_initializer))
    reads = [_node_reads(node, census) for node in graph.node]
    _ordered(graph.node, reads, census.where)
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    defined |= {o for n in graph.node for o in n.output}
    return {name for names in reads for name in names} - defined - {""}


def _node_reads(node: onnx.NodeProto, census: _Census) -> set[str]:
    reads = set(node.input)
    for graph in subgraphs(node):
        reads |= _outer_reads(graph, census)
    reads.discard("")
    return reads


def _label(nodes: Sequence[onnx.NodeProto], index: int) -> str:
    node = nodes[index]
    return repr(node.name) if node.name else f"{node.op_type or 'node'} #{index}"


def _ordered(nodes: Sequence[onnx.NodeProto], reads: list[set[str]], where: str) -> list[int]:
    """Kahn's algorithm over node indices; :class:`TeacherInvalid` on a cycle or a value
    produced twice."""
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out in producer:
                raise TeacherInvalid(
                    f"{where}: value {out!r} is produced by two nodes "
                    f"({_label(nodes, producer[out])} and {_label(nodes, i)})",
                    field="teacher",
                )
            if out:
                producer[out] = i
    readers: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, names in enumerate(reads):
        for j in {producer[n] for n in names if n in producer}:
            readers[j].append(i)
            waiting[i] += 1
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for k in readers[i]:
            waiting[k] -= 1
            if waiting[k] == 0:
                ready.append(k)
    if len(order) < len(nodes):
        cycle = _a_cycle(waiting, reads, producer)
        shown = ", ".join(_label(nodes, i) for i in cycle[:_CYCLE_NODES_SHOWN])
        more = len(cycle) - _CYCLE_NODES_SHOWN
        tail = f" and {more} more" if more > 0 else ""
        raise TeacherInvalid(
            f"{where}: the ONNX graph has a cycle through nodes {shown}{tail}", field="teacher"
        )
    return order


def _a_cycle(waiting: list[int], reads: list[set[str]], producer: dict[str, int]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm left waiting, in the order data flows,
    from the one listed first in the graph.

    Each waiting node reads from another waiting node, so walking back from one
    reaches a node already on the path.
    """
    start = next(i for i, w in enumerate(waiting) if w > 0)
    path: list[int] = []
    position: dict[int, int] = {}
    node = start
    while node not in position:
        position[node] = len(path)
        path.append(node)
        node = next(
            producer[n] for n in sorted(reads[node]) if n in producer and waiting[producer[n]] > 0
        )
    cycle = path[position[node] :][::-1]
    first = cycle.index(min(cycle))
    return cycle[first:] + cycle[:first]
