"""NonFiniteSteps: the verdict on a window's losses and gradients, read from the device once per optimizer step."""

from __future__ import annotations

import pytest
import torch

from train.nonfinite import NonFiniteLossError, NonFiniteSteps


@pytest.fixture
def host_reads(monkeypatch) -> list[str]:
    """Every device-to-host read of a tensor value (``bool``, ``float``, ``item``) made while the test runs."""
    reads: list[str] = []
    for name in ("__bool__", "__float__", "item"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def _params(grad: float = 1.0) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    params[1].grad[0, 1] = grad
    return params


def _window(steps: NonFiniteSteps, *losses: float) -> None:
    for i, loss in enumerate(losses):
        steps.start_micro_batch()
        steps.record_loss(torch.tensor(loss), f"at step 3 (micro-batch {i})")


def test_a_finite_window_is_one_host_read_for_all_losses_and_gradients(host_reads):
    steps = NonFiniteSteps()
    _window(steps, 0.5, 0.25, 0.75)
    assert host_reads == []  # recording a loss reads nothing
    params = _params()
    steps.check_update(params, 3, check_gradients=True)
    assert len(host_reads) == 1
    steps.finish_update()
    assert not steps.update_skipped and steps.skipped_steps == 0
    assert all(p.grad is not None for p in params)


def test_the_reason_names_the_first_non_finite_micro_batch_and_the_update_is_dropped():
    steps = NonFiniteSteps()
    _window(steps, 0.5, float("nan"), float("inf"))
    params = _params()
    steps.check_update(params, 3, check_gradients=True)
    steps.finish_update()
    assert steps.update_skipped and steps.skipped_steps == 1 and steps.consecutive_skips == 1
    assert all(p.grad is None for p in params)  # the optimizer will leave them unchanged

    stop = NonFiniteSteps("stop")
    _window(stop, 0.5, float("nan"))
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 3 \(micro-batch 1\).*nan_policy='stop'"
    ):
        stop.check_update(_params(), 3, check_gradients=True)


def test_non_finite_gradients_count_unless_the_grad_scaler_owns_them():
    stop = NonFiniteSteps("stop")
    _window(stop, 0.5)
    with pytest.raises(NonFiniteLossError, match="a gradient is NaN/Inf at step 3"):
        stop.check_update(_params(grad=float("inf")), 3, check_gradients=True)

    scaled = NonFiniteSteps("stop")  # 16-mixed: an inf gradient is the scaler's overflow, not an error
    _window(scaled, 0.5)
    scaled.check_update(_params(grad=float("inf")), 3, check_gradients=False)
    scaled.finish_update()
    assert not scaled.update_skipped


def test_every_rank_drops_the_update_another_rank_found_non_finite(host_reads):
    sent: list[torch.Tensor] = []

    def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        sent.append(tensor.clone())
        return tensor + 1.0  # the other rank reports a bad window

    steps = NonFiniteSteps()
    _window(steps, 0.5)
    params = _params()
    steps.check_update(params, 3, check_gradients=True, reduce=reduce)
    assert [float(t.sum()) for t in sent] == [0.0]  # this rank's own verdict went into the all-reduce
    steps.finish_update()
    assert steps.update_skipped and all(p.grad is None for p in params)
    assert steps.skipped_steps == 1


def test_more_consecutive_skips_than_allowed_stop_the_run():
    steps = NonFiniteSteps("skip", max_consecutive_skips=1)
    for expect_stop in (False, True):
        _window(steps, float("nan"))
        if expect_stop:
            with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps"):
                steps.check_update(_params(), 3, check_gradients=True)
        else:
            steps.check_update(_params(), 3, check_gradients=True)
            steps.finish_update()
    good = NonFiniteSteps("skip", max_consecutive_skips=1)
    for loss in (float("nan"), 0.5, float("nan")):  # a good window resets the run of skips
        _window(good, loss)
        good.check_update(_params(), 3, check_gradients=True)
        good.finish_update()
    assert good.skipped_steps == 2 and good.consecutive_skips == 1
