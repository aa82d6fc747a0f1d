"""ONNX-to-ONNX passes of gate2deploy.

Each pass is a function `graph -> graph` (onnx-graphsurgeon `gs.Graph`, modified in place and
returned) that opens with its contract: what it expects and what it guarantees. Analyses
(`channel_analysis`) compute facts about a graph and change nothing. Pipelines, i.e. which
passes run for which target, are declared in one place: `gate2deploy.pipeline`.
"""
