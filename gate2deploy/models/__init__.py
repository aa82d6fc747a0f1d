"""Architectures of gated research models, with the seed code's exact state-dict keys, so that
their checkpoints load with `--model gate2deploy.models.<module>:<builder>`:

- `dnn_gating`: the CIFAR ResNet-20 of dnn-gating with Precision Gating (`resnet20_pg`) and
  Channel Gating (`resnet20_cg`, and the post-activated `resnet20_cg_postact`).
- `fbs`: an ImageNet ResNet-18 with Feature Boosting and Suppression (`fbs_resnet18`).
"""
