"""FBS models from dense torchvision ResNet-18 weights.

`fbs_state_dict_from_dense(sd)` maps a torchvision ResNet-18 state dict onto
`gate2deploy.models.fbs.fbs_resnet18`'s keys: each gated conv takes the dense conv weight,
its BatchNorm's running statistics, `beta` = the BN bias, and a saliency predictor that
outputs the BN scale gamma for every input (`gate.weight` = 0, `gate.bias` = gamma). With
density 1 and gamma >= 0 the FBS model then computes exactly the dense model (up to float
rounding), a starting point for FBS fine-tuning and a realistic model for benchmarks.
"""
from __future__ import annotations

import torch

from ..errors import UserError

_GATED = ["conv1"] + [f"layer{s}.{b}.conv1" for s in range(1, 5) for b in range(2)]


def fbs_state_dict_from_dense(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for conv in _GATED:
        bn = "bn1" if conv == "conv1" else conv.rsplit(".", 1)[0] + ".bn1"
        needed = [f"{conv}.weight", f"{bn}.weight", f"{bn}.bias", f"{bn}.running_mean", f"{bn}.running_var"]
        missing = [k for k in needed if k not in sd]
        if missing:
            raise UserError(f"not a torchvision ResNet-18 state dict: missing {', '.join(missing[:3])}")
        weight = out.pop(f"{conv}.weight")
        gamma = out.pop(f"{bn}.weight")
        out[f"{conv}.conv.weight"] = weight
        out[f"{conv}.bn.running_mean"] = out.pop(f"{bn}.running_mean")
        out[f"{conv}.bn.running_var"] = out.pop(f"{bn}.running_var")
        out[f"{conv}.bn.num_batches_tracked"] = out.pop(f"{bn}.num_batches_tracked", torch.tensor(0))
        out[f"{conv}.beta"] = out.pop(f"{bn}.bias")
        out[f"{conv}.gate.weight"] = torch.zeros(weight.shape[0], weight.shape[1])
        out[f"{conv}.gate.bias"] = gamma.clone()
    return out
