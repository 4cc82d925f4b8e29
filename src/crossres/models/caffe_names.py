"""The Caffe/MMdnn names of the CR paper's SE-ResNet-50 (``conv2_1_1x1_reduce_bn.running_mean``,
``classifier_1.weight``, ...) mapped one to one onto ``SEResNet50``'s."""

from __future__ import annotations

import re

__all__ = ["caffe_to_crossres_name"]

_CAFFE_BLOCK = re.compile(
    r"^conv(?P<stage>[2-5])_(?P<block>[1-9]\d*)_"
    r"(?P<layer>1x1_reduce|3x3|1x1_increase|1x1_down|1x1_up|1x1_proj)(?P<bn>_bn)?$"
)
_CAFFE_CONV = {"1x1_reduce": "conv1", "3x3": "conv2", "1x1_increase": "conv3"}
_CAFFE_BN = {"1x1_reduce": "bn1", "3x3": "bn2", "1x1_increase": "bn3", "1x1_proj": "downsample.1"}
_CAFFE_SE = {"1x1_down": "conv4", "1x1_up": "conv5", "1x1_proj": "downsample.0"}
_CAFFE_TOP = {"conv1_7x7_s2": "conv1", "conv1_7x7_s2_bn": "bn1", "classifier_1": "fc"}


def caffe_to_crossres_name(name: str) -> str | None:
    """``conv3_1_1x1_proj_bn.running_var`` -> ``layer2.0.downsample.1.running_var``; None for
    a name outside the Caffe/MMdnn SE-ResNet-50 naming."""
    module, dot, param = name.rpartition(".")
    if not dot:
        return None
    if module in _CAFFE_TOP:
        return f"{_CAFFE_TOP[module]}.{param}"
    m = _CAFFE_BLOCK.match(module)
    if m is None:
        return None
    layer, bn = m["layer"], bool(m["bn"])
    ours = _CAFFE_BN.get(layer) if bn else (_CAFFE_CONV.get(layer) or _CAFFE_SE.get(layer))
    if ours is None:  # e.g. an SE conv with a _bn twin: not part of the layout
        return None
    return f"layer{int(m['stage']) - 1}.{int(m['block']) - 1}.{ours}.{param}"
