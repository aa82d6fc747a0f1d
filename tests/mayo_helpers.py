"""Mayo-layout TensorFlow checkpoints and an independent Mayo forward, for tests/test_mayo*.py.

Nothing here uses gate2deploy: the variable names are written out from Mayo's graph builder
(deep-fry/mayo; cited per item) and the reference forward runs TensorFlow ops in NHWC on
the raw checkpoint arrays, as Mayo's TF1 graph would.
- Scopes: `<model.name>/<module>/<layer>/` (mayo/net/tf/transform.py `_add_var_scope`,
  `_config_layer` sets scope = layer name).
- slim.conv2d: `weights` HWIO, `biases` without a normalizer; slim.batch_norm:
  `BatchNorm/beta|gamma|moving_mean|moving_variance` (beta: center, gamma: scale).
- Gated conv, parametric (mayo/net/tf/gate/base.py `_predictor`, parametric.py): `weights`
  (no biases), `BatchNorm/moving_mean|moving_variance` only, `gate/weights` [1,1,Cin,Cout],
  `gate/biases`, `gate/shift`; threshold local: `<layer>/gate/threshold`.
- NetworkSlimmer on activation (mayo/override/base.py `_tracking_getter`, Parameter):
  `<layer>/activations/NetworkSlimmer.mask` (bool [C]) and `.enable` (bool scalar).
- Optimizer slots: Mayo's trainers use tf.train.RMSPropOptimizer with momentum
  (trainers/cifarnet.yaml): TF1 creates `<var>/RMSProp` and `<var>/RMSProp_1`.
- Session scalars outside the model scope: `imgs_seen` (int64), `mayo/config` (string)
  (mayo/session/base.py).
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import triton  # noqa: E402,F401 - before TensorFlow, or loading it later crashes (importers/mayo.py _tensorflow)
import tensorflow as tf  # noqa: E402

# ---- Mayo YAMLs (abridged from the repository: initializers/regularizers/preprocessing left
# out; the structure, anchors, _import chains, ^() and $() placeholders as in Mayo) --------

YAMLS = {
    "models/resnet18.yaml": """
        ---
        model:
            name: resnet18
            layers:
                _conv: &conv
                    type: convolution
                    normalizer_fn: tensorflow.contrib.slim.batch_norm
                    normalizer_params: {scale: true, decay: 0.997, epsilon: 0.00001}
                conv1: {<<: *conv, kernel_size: 7, stride: 2, padding: 3, num_outputs: 64}
                pool1: {type: max_pool, kernel_size: 3, stride: 2, padding: 1}
                _basic_block: &bb
                    type: module
                    kwargs: {stride: null, depth: null, shortcut: null}
                    layers:
                        conv1: &bbconv
                            <<: *conv
                            kernel_size: 3
                            stride: ^(stride)
                            padding: 1
                            num_outputs: ^(depth)
                        conv2: {<<: *bbconv, stride: 1, activation_fn: null}
                        downsample_shortcut:
                            <<: *bbconv
                            kernel_size: 1
                            padding: valid
                            activation_fn: null
                        identity_shortcut: {type: identity}
                        add: {type: add}
                        relu: {type: activation, mode: relu}
                    graph:
                        - {from: input, with: [conv1, conv2], to: a}
                        - {from: input, with: ^(shortcut)_shortcut, to: b}
                        - {from: [a, b], with: add, to: preact}
                        - {from: preact, with: relu, to: output}
                b11: {<<: *bb, stride: 1, depth: 64, shortcut: identity}
                b12: {<<: *bb, stride: 1, depth: 64, shortcut: identity}
                b21: {<<: *bb, stride: 2, depth: 128, shortcut: downsample}
                b22: {<<: *bb, stride: 1, depth: 128, shortcut: identity}
                b31: {<<: *bb, stride: 2, depth: 256, shortcut: downsample}
                b32: {<<: *bb, stride: 1, depth: 256, shortcut: identity}
                b41: {<<: *bb, stride: 2, depth: 512, shortcut: downsample}
                b42: {<<: *bb, stride: 1, depth: 512, shortcut: identity}
                pool4: {type: average_pool, kernel_size: 7}
                flatten4: {type: flatten}
                fc5: {type: fully_connected, num_outputs: $(dataset.task.num_classes), activation_fn: null}
            graph:
                from: input
                with: [conv1, pool1, b11, b12, b21, b22, b31, b32, b41, b42, pool4, flatten4, fc5]
                to: output
        """,
    "models/gate/resnet18.yaml": """
        ---
        _import: ../resnet18.yaml
        _trainable: true
        _gate:
            enable: true
            policy: parametric
            density: 1.0
            pool: avg
            regularizer: null
            threshold: online
            trainable: true
        model:
            name: resnet18
            layers:
                _gated_conv: &gated_conv
                    type: gated_convolution
                    gate_params: $(_gate)
                    trainable: $(_gate.trainable)
                _basic_block: &bb
                    layers:
                        conv1: &bb_gated_conv
                            <<: *gated_conv
                            gate_params: $(_gate)
                        conv2: {<<: *bb_gated_conv}
                        downsample_shortcut: {<<: *bb_gated_conv}
                conv1: {<<: *gated_conv}
                b11: {<<: *bb}
                b12: {<<: *bb}
                b21: {<<: *bb}
                b22: {<<: *bb}
                b31: {<<: *bb}
                b32: {<<: *bb}
                b41: {<<: *bb}
                b42: {<<: *bb}
        """,
    "models/cifarnet.yaml": """
        ---
        model:
            name: cifarnet
            layers:
                _conv: &conv
                    type: convolution
                    padding: same
                    kernel_size: 3
                    normalizer_fn: tensorflow.contrib.slim.batch_norm
                    normalizer_params: {center: true, scale: true, decay: 0.9997, epsilon: 0.001}
                conv0: {<<: *conv, num_outputs: 64, padding: valid}
                conv1: {<<: *conv, num_outputs: 64}
                conv2: {<<: *conv, num_outputs: 128, stride: 2}
                conv3: {<<: *conv, num_outputs: 128}
                dropout3: {type: dropout, keep_prob: 0.5}
                conv4: {<<: *conv, num_outputs: 128}
                conv5: {<<: *conv, num_outputs: 192, stride: 2}
                conv6: {<<: *conv, num_outputs: 192}
                dropout6: {type: dropout, keep_prob: 0.5}
                conv7: {<<: *conv, num_outputs: 192}
                pool7: {type: average_pool, kernel_size: 8}
                logits:
                    <<: *conv
                    kernel_size: 1
                    num_outputs: $(dataset.task.num_classes)
                    activation_fn: null
                    normalizer_fn: null
                squeeze: {type: squeeze, axis: [1, 2]}
            graph:
                from: input
                with: [conv0, conv1, conv2, conv3, dropout3, conv4, conv5, conv6, dropout6, conv7, pool7,
                       logits, squeeze]
                to: output
        """,
    "models/override/cifarnet.yaml": """
        ---
        _import: ../cifarnet.yaml
        model.layers:
            conv0: &conv {overrider: $(_overrider.conv)}
            conv1: {<<: *conv}
            conv2: {<<: *conv}
            conv3: {<<: *conv}
            conv4: {<<: *conv}
            conv5: {<<: *conv}
            conv6: {<<: *conv}
            conv7: {<<: *conv}
            logits: {overrider: $(_overrider.logits)}
        """,
    "models/override/prune/netslim.yaml": """
        ---
        _overrider:
            conv: &slim
                activation:
                    netslim:
                        type: mayo.override.NetworkSlimmer
                        density: 1.0
                        weight: 0.00001
                        should_update: true
                        _priority: 100
            pointwise: {<<: *slim}
            fc: null
            logits: null
        """,
    "models/gate/cifarnet.yaml": """
        ---
        _import: ../cifarnet.yaml
        _trainable: true
        _gate:
            enable: true
            policy: parametric
            density: 1.0
            pool: avg
            regularizer: {}
            threshold: online
        model:
            layers:
                _gated_conv: &gated_conv
                    type: gated_convolution
                    gate_params: $(_gate)
                    trainable: $(_trainable)
                conv0: {<<: *gated_conv}
                conv1: {<<: *gated_conv}
                conv2: {<<: *gated_conv}
                conv3: {<<: *gated_conv}
                conv4: {<<: *gated_conv}
                conv5: {<<: *gated_conv}
                conv6: {<<: *gated_conv}
                conv7: {<<: *gated_conv}
        """,
    # a gated + slimmed composition Mayo can run: odd convs gated, even convs slimmed (a
    # NetworkSlimmer on a gated conv cannot run in Mayo: see importers/mayo.py)
    "models/gate/cifarnet_slim_mix.yaml": """
        ---
        _import: ../cifarnet.yaml
        _gate: {enable: true, policy: parametric, density: 0.5, pool: avg, threshold: online}
        model.layers:
            conv0: &slim {overrider: $(_overrider.conv)}
            conv1: &gated {type: gated_convolution, gate_params: $(_gate)}
            conv2: {<<: *slim}
            conv3: {<<: *gated}
            conv4: {<<: *slim}
            conv5: {<<: *gated}
            conv6: {<<: *slim}
            conv7: {<<: *gated}
        """,
    "datasets/cifar10.yaml": """
        ---
        dataset:
            name: cifar10
            task: {type: mayo.task.image.Classify, num_classes: 10}
        """,
}


def write_mayo_root(root: Path) -> Path:
    for rel, text in YAMLS.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text).lstrip())
    return root


# ---- checkpoints ------------------------------------------------------------------------

def write_checkpoint(prefix: Path, arrays: dict[str, np.ndarray], trainable: set[str]) -> str:
    """A TF1 name-based checkpoint of `arrays`, with RMSProp slots for the trainables and
    Mayo's session scalars, written by tf.compat.v1's Saver."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        variables = {}
        for name, value in arrays.items():
            dtype = tf.bool if value.dtype == bool else tf.float32
            variables[name] = v1.get_variable(name, shape=value.shape, dtype=dtype, trainable=name in trainable,
                                              initializer=v1.constant_initializer(value) if value.dtype != bool
                                              else v1.zeros_initializer())
        v1.get_variable("imgs_seen", shape=[], dtype=tf.int64, initializer=v1.zeros_initializer(), trainable=False)
        v1.get_variable("mayo/config", shape=[], dtype=tf.string, initializer=v1.constant_initializer(""),
                        trainable=False)
        train = [variables[n] for n in arrays if n in trainable]
        loss = tf.add_n([tf.reduce_sum(tf.square(v)) for v in train])
        step = v1.train.RMSPropOptimizer(0.01, decay=0.9, momentum=0.9, epsilon=1.0).minimize(loss)
        assign = [v1.assign(variables[n], value) for n, value in arrays.items() if value.dtype == bool]
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            sess.run(step)  # slots hold something; then the weights are put back
            for n, value in arrays.items():
                if value.dtype != bool:
                    variables[n].load(value, sess)
            sess.run(assign)
            return v1.train.Saver().save(sess, str(prefix), write_meta_graph=False)


class Arrays(dict):
    """name -> array, plus which are trainable."""

    def __init__(self, seed: int):
        super().__init__()
        self.rng = np.random.default_rng(seed)
        self.trainable: set[str] = set()

    def add(self, name, shape, kind="normal", trainable=True):
        if kind == "normal":
            v = self.rng.normal(0, 1, shape).astype(np.float32)
        elif kind == "var":
            v = self.rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif kind == "gate_bias":
            v = self.rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            raise ValueError(kind)
        if kind == "normal" and len(shape) == 4:
            v /= math.sqrt(shape[0] * shape[1] * shape[2])
        if kind == "normal" and len(shape) == 2:
            v /= math.sqrt(shape[0])
        self[name] = v
        if trainable:
            self.trainable.add(name)
        return v


def add_conv(a: Arrays, scope: str, k: int, cin: int, cout: int, bn="scale_center", slim=False, slim_keep=None):
    a.add(f"{scope}/weights", (k, k, cin, cout))
    if bn is None:
        a.add(f"{scope}/biases", (cout,))
        return
    a.add(f"{scope}/BatchNorm/beta", (cout,))
    a.add(f"{scope}/BatchNorm/gamma", (cout,))
    a.add(f"{scope}/BatchNorm/moving_mean", (cout,), trainable=False)
    a.add(f"{scope}/BatchNorm/moving_variance", (cout,), "var", trainable=False)
    if slim:
        keep = np.ones(cout, bool) if slim_keep is None else slim_keep
        a[f"{scope}/activations/NetworkSlimmer.mask"] = keep
        a[f"{scope}/activations/NetworkSlimmer.enable"] = np.array(True)


def add_gated(a: Arrays, scope: str, k: int, cin: int, cout: int, hidden: int = 0):
    """hidden > 0: the predictor's first FC (gate_params.factor: hidden = ceil(cout / factor))."""
    a.add(f"{scope}/weights", (k, k, cin, cout))
    a.add(f"{scope}/BatchNorm/moving_mean", (cout,), trainable=False)
    a.add(f"{scope}/BatchNorm/moving_variance", (cout,), "var", trainable=False)
    # saliencies near 1 and a small shift keep activations O(1) through deep random nets (a
    # gamma growing with its input compounds layer after layer), so 1e-5 relative is a fair bar
    if hidden:
        a.add(f"{scope}/gate/factor/weights", (1, 1, cin, hidden))
        a[f"{scope}/gate/factor/weights"] *= 0.2
        a.add(f"{scope}/gate/factor/biases", (hidden,), "gate_bias")
        cin = hidden
    a.add(f"{scope}/gate/weights", (1, 1, cin, cout))
    a[f"{scope}/gate/weights"] *= 0.2
    a.add(f"{scope}/gate/biases", (cout,), "gate_bias")
    a.add(f"{scope}/gate/shift", (cout,))
    a[f"{scope}/gate/shift"] *= 0.1


# ---- the reference forward (NHWC, TensorFlow ops on the raw arrays) --------------------

def ref_conv(a, scope, x, stride, padding, eps, act=True, slim=False):
    """slim.conv2d + slim.batch_norm (+ NetworkSlimmer mask before the activation);
    `padding` an int pads zeros first (Mayo's instantiate_numeric_padding), else SAME/VALID."""
    if isinstance(padding, int):
        x = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        padding = "VALID"
    y = tf.nn.conv2d(x, a[f"{scope}/weights"], stride, padding)
    if f"{scope}/biases" in a:
        y = y + a[f"{scope}/biases"]
    else:
        y = (y - a[f"{scope}/BatchNorm/moving_mean"]) / tf.sqrt(a[f"{scope}/BatchNorm/moving_variance"] + eps)
        y = y * a[f"{scope}/BatchNorm/gamma"] + a[f"{scope}/BatchNorm/beta"]
    if slim and bool(a[f"{scope}/activations/NetworkSlimmer.enable"]):
        y = y * tf.cast(a[f"{scope}/activations/NetworkSlimmer.mask"], y.dtype)
    return tf.nn.relu(y) if act else y


def ref_gated(a, scope, x, stride, padding, eps, density, act=True, pool="avg", threshold=None):
    """Mayo's ParametricGatedConvolution with threshold online (gate/base.py subsample,
    _predictor, _find_threshold, bool_actives; parametric.py normalize, activate). With
    `<scope>/gate/factor/weights` in `a` (gate_params.factor > 0), _predictor's first FC of
    ceil(C / factor) outputs, with the layer's activation, comes before the gate's."""
    if isinstance(padding, int):
        x = tf.pad(x, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
        padding = "VALID"
    # subsample: avg pool over the (numerically padded) input; l1 of |x|, l2 of x^2 (no root)
    pooled = tf.reduce_mean({"avg": x, "l1": tf.abs(x), "l2": tf.square(x)}[pool], axis=[1, 2])
    if f"{scope}/gate/factor/weights" in a:
        pooled = tf.matmul(pooled, a[f"{scope}/gate/factor/weights"][0, 0]) + a[f"{scope}/gate/factor/biases"]
        if act:
            pooled = tf.nn.relu(pooled)
    gamma = tf.matmul(pooled, a[f"{scope}/gate/weights"][0, 0]) + a[f"{scope}/gate/biases"]
    if act:
        gamma = tf.nn.relu(gamma)
    c = gamma.shape[-1]
    k = math.ceil(c * density)
    if threshold is not None:  # `local` / `global`: the stored EMA threshold (bool_actives)
        active = tf.cast(gamma > threshold, gamma.dtype)
    elif k == c:
        active = tf.ones_like(gamma)
    else:
        top, _ = tf.nn.top_k(gamma, k=k + 1)
        active = tf.cast(gamma > tf.reduce_min(top, axis=1, keepdims=True), gamma.dtype)
    y = tf.nn.conv2d(x, a[f"{scope}/weights"], stride, padding)
    y = (y - a[f"{scope}/BatchNorm/moving_mean"]) / tf.sqrt(a[f"{scope}/BatchNorm/moving_variance"] + eps)
    y = y * (active * gamma)[:, None, None, :] + (active * a[f"{scope}/gate/shift"])[:, None, None, :]
    return tf.nn.relu(y) if act else y
