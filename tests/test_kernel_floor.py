"""The kernel-time floor (gate2deploy/kernel_floor.py) that tools/bench_fold_torchvision.py
prints beside each quotient: its arithmetic, checked against hand-computed values."""
import pytest

from gate2deploy.kernel_floor import DENSE, GROUPED, floor_ratio, work_ratio


def test_floor_shrinks_each_kind_with_its_own_work():
    dense_ms = {DENSE: 3.0, GROUPED: 2.0, "Relu": 1.0}
    dense_work = {DENSE: 100.0, GROUPED: 10.0, "elements": 50.0}
    folded_work = {DENSE: 25.0, GROUPED: 9.0, "elements": 20.0}
    # by hand: convs with their MACs (0.25, 0.9), Relu with the activation elements (0.4)
    assert floor_ratio(dense_ms, dense_work, folded_work) == pytest.approx((3 * 0.25 + 2 * 0.9 + 1 * 0.4) / 6)


def test_kinds_the_source_graph_lacks_count_as_memory_bound():
    # ONNX Runtime runs an unfusable BatchNormalization as a 1x1 depthwise conv: a grouped
    # kind the source graph has no MACs for is charged with the activation elements
    assert work_ratio(GROUPED, {DENSE: 10.0, "elements": 40.0}, {DENSE: 5.0, "elements": 10.0}) == 0.25
