"""The grouped evaluator: every network's predictions exactly as when it runs alone, streamed or chunked,
and the MACs it must compute."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import MODELS, PAIRS, fake, tiny_vit  # noqa: E402,F401

from klas.stitch.network import StitchNet, StitchSpec, stitch_id  # noqa: E402
from klas.train.data import SplitData  # noqa: E402
from klas.train.evaluate import correct_per_image, evaluate_all, required_macs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(kind: str = "linear") -> StitchNet:
    torch.manual_seed(0)
    specs = [StitchSpec(stitch_id(*p), *p) for p in PAIRS]
    return StitchNet.from_loaded([tiny_vit(n) for n in MODELS], specs, kind=kind).eval()


@pytest.mark.parametrize("chunk", [0, 64], ids=["streamed", "chunked"])
def test_the_grouped_evaluator_equals_every_network_alone(fake, chunk):
    net = _net("mlp")
    data = SplitData(fake, "eval")
    ids = net.stitch_ids + net.anchor_names
    got = correct_per_image({"t": (net, ids)}, data, batch_size=32, device=torch.device("cpu"), chunk_images=chunk)["t"]
    with torch.no_grad():
        for i in ids:
            alone = torch.cat([(net.model(i)(x).argmax(1) == y) for x, y, _ in data.batches(range(data.n), 32, torch.device("cpu"))])
            np.testing.assert_array_equal(got[i], alone.numpy(), err_msg=i)
    acc = evaluate_all(net, data, ids, batch_size=32, device=torch.device("cpu"), chunk_images=chunk)
    assert acc == {i: float(got[i].mean()) for i in ids}


def test_required_macs_are_each_model_once_plus_every_stitch_suffix():
    net = _net()
    ids = net.stitch_ids + net.anchor_names
    want = sum(net.profiles[n].macs for n in MODELS)
    for s in net.specs.values():
        want += net.macs(s.id) - net.profiles[s.src].prefix_macs(s.src_cut)
    assert required_macs(net, ids) == want
    one = net.specs[net.stitch_ids[0]]  # the measure: its source model's whole forward, then its own part
    assert required_macs(net, [one.id]) == net.profiles[one.src].macs + net.macs(one.id) - net.profiles[one.src].prefix_macs(one.src_cut)
