"""Architectures of gated research models, with the seed code's exact state-dict keys, so that
their checkpoints load with `--model gate2deploy.models.<module>:<builder>`:

- `dnn_gating`: the CIFAR ResNet-20 of dnn-gating with Precision Gating (`resnet20_pg`) and
  Channel Gating (`resnet20_cg`, and the post-activated `resnet20_cg_postact`).
- `fbs`: an ImageNet ResNet-18 with Feature Boosting and Suppression (`fbs_resnet18`).
- `slimmable`: Joslim's slimmable ResNets (`resnet20`, ..., `resnet50`) and `mobilenetv2`
  (exported at one width by importers/slimmable.py).

Hyper-parameters that decide the output and are not stored in a checkpoint (CG `partitions`
and `shuffle`, PG `wbits`/`abits`/`pred_bits`, FBS `density`) have no default: a builder
called without one raises a `UserError` naming it (the CLI: exit 2), because a guessed value
exports a wrong model that still "verifies" against the same wrong PyTorch model. State them
as the seed's training script was run, e.g. `--model-kwargs '{"partitions": 4, "shuffle": false}'`.
"""
from __future__ import annotations

from ..errors import UserError


def require_stated(builder: str, example: str, **values) -> None:
    """Refuse a build whose numerics-deciding arguments were not given (left as None)."""
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise UserError(f"gate2deploy.models.{builder} needs {', '.join(missing)}: not stored in the checkpoint "
                        f"and they decide the output; state them as the model was trained, "
                        f"e.g. --model-kwargs '{example}'")
