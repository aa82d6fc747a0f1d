"""gate2deploy: a deployment compiler for gated and pruned neural networks.

Pipeline (see README.md and the docs at the top of each module):

    checkpoint --loading--> nn.Module + masks --capture--> ONNX graph with gate2deploy nodes
        --passes--> folded / lowered ONNX --verify--> written atomically + report
"""
__version__ = "0.1.0"
