"""Pass: canonical clean-up before and after the channel passes.

Expects: any graph. Guarantees: the same function; `Identity` nodes that only forward a
constant (the TorchScript exporter's way of sharing equal initializers) are gone, every
consumer referencing its own constant tensor, so that slicing one layer's weights can never
change another's; dead nodes are removed and nodes are topologically sorted.
"""
from __future__ import annotations

import onnx_graphsurgeon as gs

from .ir import const_value, new_const


def cleanup(graph: gs.Graph) -> gs.Graph:
    for node in [n for n in graph.nodes if n.op == "Identity" and (n.domain or "") in ("", "ai.onnx")]:
        value = const_value(node.inputs[0])
        out = node.outputs[0]
        if value is None or out in graph.outputs:
            continue
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = new_const(f"{out.name}__{consumer.name}_{i}", value.copy())
        node.outputs.clear()
    return graph.cleanup().toposort()
