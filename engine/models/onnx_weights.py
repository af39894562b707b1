"""Read the weights of an ONNX file as data: initializers, and for each the nodes that consume it.

Nothing in the graph is executed. Exported ONNX files often give weights anonymous names
(`onnx::MatMul_1234`); what identifies them is the node that consumes them
(`/blocks.0/attn/query/MatMul`), so the reader keeps that link for the model loaders. It also keeps
the node list (op type, inputs, outputs, small attributes), so that a loader can follow a value to
the node that produces it, e.g. a Reshape's shape back to its constants.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CheckpointError


@dataclass(frozen=True)
class Consumer:
    node: str          # node name, e.g. "/blocks.0/attn/query/MatMul"
    op_type: str       # e.g. "MatMul"
    index: int         # which input of the node the initializer is


@dataclass(frozen=True)
class OnnxNode:
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict          # the same small attributes as OnnxWeights.node_attributes


@dataclass
class OnnxWeights:
    path: str
    initializers: dict[str, np.ndarray]
    consumers: dict[str, list[Consumer]]
    node_attributes: dict[str, dict] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)
    nodes: list[OnnxNode] = field(default_factory=list)            # in graph order
    producers: dict[str, OnnxNode] = field(default_factory=dict)   # value name -> the node that outputs it

    def consumed_by(self, node_name: str, index: int | None = None) -> list[str]:
        """Initializer names feeding the node called `node_name` (optionally at one input index)."""
        return [name for name, users in self.consumers.items()
                for c in users if c.node == node_name and (index is None or c.index == index)]


def read_onnx_weights(path: str | os.PathLike) -> OnnxWeights:
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf/IO errors have many types
        raise CheckpointError(f"cannot read ONNX file {path}: {exc}") from exc
    graph = model.graph
    initializers = {}
    for init in graph.initializer:
        initializers[init.name] = numpy_helper.to_array(init)
    consumers: dict[str, list[Consumer]] = {name: [] for name in initializers}
    attributes = {}
    nodes = []
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in consumers:
                consumers[name].append(Consumer(node.name, node.op_type, index))
        simple = {}
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS,
                             onnx.AttributeProto.FLOAT, onnx.AttributeProto.FLOATS):
                simple[attr.name] = onnx.helper.get_attribute_value(attr)
            elif attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                # small constants only (shape pieces, head counts); big ones are not needed
                if np.prod(attr.t.dims, dtype=np.int64) <= 16:
                    simple[attr.name] = numpy_helper.to_array(attr.t)
        attributes[node.name] = simple
        nodes.append(OnnxNode(node.name, node.op_type, tuple(node.input), tuple(node.output), simple))
    inputs = [i.name for i in graph.input if i.name not in initializers]
    producers = {out: n for n in nodes for out in n.outputs if out}
    return OnnxWeights(os.fspath(path), initializers, consumers, attributes, inputs, nodes, producers)
