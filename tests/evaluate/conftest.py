"""An Inception-v3 with random weights, saved as a state-dict file and loaded back the way users load theirs."""
import sys
from unittest import mock

import pytest
import torch

from freeflow.evaluate import inception_class


def random_inception_state(seed=0):
    """torch-fidelity's Inception-v3 architecture, He-initialised (activations keep their scale through the
    ~90 conv layers, so features vary between images), BatchNorm at identity."""
    cls = inception_class()
    module = sys.modules[cls.__module__]
    with mock.patch.object(module, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None):
        net = cls("inception-v3-compat", ["2048"])
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=2048 ** -0.5)
            torch.nn.init.normal_(m.bias, std=0.1)
    return net.state_dict()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(random_inception_state(), str(path))
    return str(path)
