"""``gradsim_accumulate_grad_batches = k``: the gate runs once on the gradients accumulated over k
micro-batches, which equals one step on the k-times larger batch."""

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_gradsim.core.task_gradients import TaskGradients
from lightning_gradsim.core.transforms import Accumulate

from ..scale_utils import BatchList, TinyNet, fit, make_batches, merge_pairs, params, trainer


@pytest.mark.parametrize(
    "rule, gate, optimizer",
    [("unweighted", {"cosine_ema": 0.5}, "adam"), ("projection", {"main_grad_ema": 0.5}, "sgd")],
)
def test_accumulation_equals_one_step_on_the_larger_batch(rule, gate, optimizer):
    batches = make_batches(7, 4)  # windows of 2: [0,1] [2,3] [4,5] and the epoch's last batch [6] alone
    acc = fit(TinyNet(rule, optimizer, gate, accumulate=2, scheduler=True), batches)
    ref = fit(TinyNet(rule, optimizer, gate, accumulate=1, scheduler=True), merge_pairs(batches, 2))
    assert acc.global_step == ref.global_step == 4
    assert int(acc.gradsim.step) == 4  # the gate ran once per window, not per micro-batch
    _close_logs(acc.gate_log, ref.gate_log)
    opened = [o for _, opens, _ in ref.gate_log for o in opens]
    if rule == "unweighted":
        assert any(opened) and not all(opened), "the data should open and close the gate"
    for (name, a), b in zip(params(acc).items(), params(ref).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(acc.gradsim.cosine_state, ref.gradsim.cosine_state, atol=1e-6, rtol=1e-5)


def _close_logs(a, b):
    assert len(a) == len(b)
    for (ca, oa, sa), (cb, ob, sb) in zip(a, b):
        assert oa == ob and sa == sb
        torch.testing.assert_close(torch.tensor(ca), torch.tensor(cb), atol=1e-5, rtol=1e-5)
    return True


def test_accumulation_differs_from_stepping_every_micro_batch():
    """Guard: the comparison above can fail (stepping per micro-batch gives other weights)."""
    batches = make_batches(4, 4)
    per_micro = fit(TinyNet(accumulate=1), batches)
    merged = fit(TinyNet(accumulate=1), merge_pairs(batches, 2))
    assert not torch.allclose(per_micro.trunk[0].weight, merged.trunk[0].weight, atol=1e-4)


def test_accumulator_sums_and_counts():
    acc = Accumulate()
    acc.final = False
    first = TaskGradients(stacked=[torch.ones(2, 3), None], others=[torch.ones(4)], reached=[True, False])
    assert acc.task_gradients(first) == "pending"
    acc.final = True
    grads = TaskGradients(stacked=[torch.full((2, 3), 2.0), torch.ones(2, 1)], others=[None], reached=[True, True])
    assert acc.task_gradients(grads) == "ready"
    # The window's mean (the sums over 2 micro-batches, divided by 2), in the bundle the gate goes on with.
    assert grads.reached == [True, True] and grads.finite is None
    torch.testing.assert_close(grads.stacked[0], torch.full((2, 3), 1.5))
    torch.testing.assert_close(grads.stacked[1], torch.full((2, 1), 0.5))
    torch.testing.assert_close(grads.others[0], torch.full((4,), 0.5))
    assert acc.count == 0 and acc.state_dict() == {}
    acc.final = False
    acc.task_gradients(TaskGradients(stacked=[torch.ones(1, 1)], others=[], reached=[True]))
    with pytest.raises(ValueError, match="changed between accumulated micro-batches"):
        acc.task_gradients(TaskGradients(stacked=[torch.ones(1, 1), torch.ones(1, 1)], others=[], reached=[True]))


def test_bad_accumulate_value_and_trainer_flag_are_refused():
    model = TinyNet(accumulate=0)
    with pytest.raises(ValueError, match="gradsim_accumulate_grad_batches must be an integer >= 1"):
        fit(model, make_batches(2, 4))
    with pytest.raises(MisconfigurationException, match="gradsim_accumulate_grad_batches = 2"):
        trainer(accumulate_grad_batches=2).fit(TinyNet(), train_dataloaders=BatchList(make_batches(2, 4)))


def test_custom_gradsim_backward_must_go_through_the_gate_when_accumulating():
    class OwnBackward(TinyNet):
        def gradsim_backward(self, gate, main_loss, aux_losses):
            (main_loss + sum(aux_losses.values())).backward()
            return None

    with pytest.raises(RuntimeError, match="did not call gate.backward"):
        fit(OwnBackward(accumulate=2), make_batches(2, 4))


def test_gradnorm_accumulation_equals_one_step_on_the_larger_batch():
    """GradNorm adapts its weights from the window's losses (their mean over the micro-batches), not
    from the last micro-batch's: accumulating equals one step on the larger batch."""
    batches = make_batches(8, 4)
    acc = fit(TinyNet(method="gradnorm", optimizer="sgd", gate={"lr": 1.0}, accumulate=2), batches)
    ref = fit(TinyNet(method="gradnorm", optimizer="sgd", gate={"lr": 1.0}), merge_pairs(batches, 2))
    w_acc, w_ref = acc.gradsim.loss_weighting.task_weights, ref.gradsim.loss_weighting.task_weights
    assert (w_ref - 1).abs().max() > 0.02  # the weights moved
    torch.testing.assert_close(w_acc, w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(acc.gradsim.loss_weighting.initial_losses, ref.gradsim.loss_weighting.initial_losses)
    for (name, a), b in zip(params(acc).items(), params(ref).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
