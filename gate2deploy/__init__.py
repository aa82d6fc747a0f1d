"""gate2deploy: a deployment compiler for gated and pruned neural networks.

    import gate2deploy
    compiled = gate2deploy.compile(model_or_checkpoint, example_inputs, target="ort", **options)
    compiled.save("model.onnx"); compiled.report; compiled.run(x)
    gate2deploy.info(...); gate2deploy.profile(...)

Pipeline (README.md "Architecture"; each module opens with its contract):

    checkpoint --loading--> nn.Module + masks --capture--> ONNX graph with gate2deploy nodes
        --passes--> folded / lowered ONNX --verify--> written atomically + report

The API is imported on first use, so `import gate2deploy` stays light (no torch until then).
"""
__version__ = "0.1.0"

__all__ = ["compile", "info", "profile", "CompiledModel", "UserError"]


def __getattr__(name):
    if name in ("compile", "info", "profile", "CompiledModel"):
        from . import api
        return getattr(api, name)
    if name == "UserError":
        from .errors import UserError
        return UserError
    raise AttributeError(f"module 'gate2deploy' has no attribute {name!r}")
