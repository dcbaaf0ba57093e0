"""dyvm.ema.ModelEma: timm's ModelEmaV3 with the tensor pairing kept between steps; the EMA must stay bit for bit
timm's, through in-place updates, a re-created parameter and a state restored into the EMA."""
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

from dyvm.ema import ModelEma


def _model():
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))  # (BatchNorm: an integer buffer)


def _train_a_step(model):
    model.train()
    model(torch.randn(4, 6)).square().sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
            p.grad = None


def test_the_ema_is_timms_bit_for_bit():
    model = _model()
    ours, timms = ModelEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for step in range(6):
        _train_a_step(model)
        if step == 2:  # a re-created parameter: the pairing is rebuilt
            model[2].weight = nn.Parameter(model[2].weight.detach() + 1.0)
        if step == 4:  # a checkpoint restored into both EMAs (in place)
            state = {k: v + 0.5 if v.is_floating_point() else v for k, v in timms.module.state_dict().items()}
            ours.module.load_state_dict(state)
            timms.module.load_state_dict(state)
        ours.update(model, step=step)
        timms.update(model, step=step)
        for (name, a), b in zip(ours.module.state_dict().items(), timms.module.state_dict().values()):
            assert torch.equal(a, b), (step, name)
    assert ours.module[1].num_batches_tracked == model[1].num_batches_tracked == 6
