"""Read the weights of an ONNX file as data: initializers, and for each the nodes that consume it.

Nothing in the graph is executed. Exported ONNX files often give weights anonymous names
(`onnx::MatMul_1234`); what identifies them is the node that consumes them
(`/blocks.0/attn/query/MatMul`), so the reader keeps that link for the model loaders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .audio.tokenizer_errors import TokenizerCheckpointError


@dataclass(frozen=True)
class Consumer:
    node: str          # node name, e.g. "/blocks.0/attn/query/MatMul"
    op_type: str       # e.g. "MatMul"
    index: int         # which input of the node the initializer is


@dataclass
class OnnxWeights:
    path: str
    initializers: dict[str, np.ndarray]
    consumers: dict[str, list[Consumer]]
    node_attributes: dict[str, dict] = field(default_factory=dict)
    graph_inputs: list[str] = field(default_factory=list)

    def consumed_by(self, node_name: str, index: int | None = None) -> list[str]:
        """Initializer names feeding the node called `node_name` (optionally at one input index)."""
        return [name for name, users in self.consumers.items()
                for c in users if c.node == node_name and (index is None or c.index == index)]


def read_onnx_weights(path: str | os.PathLike) -> OnnxWeights:
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # noqa: BLE001 - protobuf/IO errors have many types
        raise TokenizerCheckpointError(f"cannot read ONNX file {path}: {exc}") from exc
    graph = model.graph
    initializers = {}
    for init in graph.initializer:
        initializers[init.name] = numpy_helper.to_array(init)
    consumers: dict[str, list[Consumer]] = {name: [] for name in initializers}
    attributes = {}
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
    inputs = [i.name for i in graph.input if i.name not in initializers]
    return OnnxWeights(os.fspath(path), initializers, consumers, attributes, inputs)
