"""Partial fine-tuning's losses: the distillation term against a float64 closed form, a teacher
equal to the student leaves the weights untouched, distillation pulls a student towards its
teacher, and the run keeps a dense teacher only when the loss needs one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amrc_exp.compress.finetune import FinetuneLoss, distill_kl, partial_finetune


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """T^2 * mean over rows of sum_k p_k (log p_k - log q_k), with plain float64 loops."""
    total = 0.0
    for s_row, t_row in zip(student.double().tolist(), teacher.double().tolist()):
        zs = [v / t for v in s_row]
        zt = [v / t for v in t_row]
        ls = math.log(sum(math.exp(v - max(zs)) for v in zs)) + max(zs)
        lt = math.log(sum(math.exp(v - max(zt)) for v in zt)) + max(zt)
        total += sum(math.exp(b - lt) * ((b - lt) - (a - ls)) for a, b in zip(zs, zt))
    return t * t * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distill_kl_matches_the_closed_form(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g) * 3
    assert distill_kl(student, teacher, temperature).item() == pytest.approx(
        _kl_by_hand(student, teacher, temperature), rel=1e-5)
    assert distill_kl(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_mixed_loss_weighs_ce_and_kd():
    g = torch.Generator().manual_seed(1)
    out, target, labels = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 1])
    ce = nn.functional.cross_entropy(out, labels).item()
    kd = _kl_by_hand(out, target, 3.0)
    mixed = FinetuneLoss("ce+kd", temperature=3.0, weight=0.25)(out, labels, target).item()
    assert mixed == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)
    assert FinetuneLoss("ce")(out, labels, None).item() == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ValueError, match="one of ce, kd, ce\\+kd"):
        FinetuneLoss("mse")


class _Net(nn.Module):
    """timm-style names: `head.*` and biases are what partial fine-tuning trains."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _loader(n: int = 64):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_distill_kl_gradient_is_the_softened_probability_gap(temperature):
    """d/ds [T^2 KL(softmax(t/T) || softmax(s/T))] = T (softmax(s/T) - softmax(t/T)) / batch: zero at s = t."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 5, generator=g, requires_grad=True), torch.randn(4, 5, generator=g)
    distill_kl(student, teacher, temperature).backward()
    expected = temperature * (torch.softmax(student.detach() / temperature, -1)
                              - torch.softmax(teacher / temperature, -1)) / len(student)
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)


def test_distillation_pulls_the_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = _Net()
    torch.manual_seed(1)
    student = _Net()
    x = torch.cat([b[0] for b in _loader()])

    def gap() -> float:
        with torch.no_grad():
            return distill_kl(student(x), teacher(x), 1.0).item()

    start = gap()
    partial_finetune(student, _loader(), epochs=20, lr=5e-2, weight_decay=0.0, device=torch.device("cpu"),
                     loss=FinetuneLoss("kd", temperature=1.0), teacher=teacher)
    assert gap() < 0.5 * start, (start, gap())


def test_kd_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="teacher"):
        partial_finetune(_Net(), _loader(), epochs=1, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"),
                         loss=FinetuneLoss("ce+kd"))


def test_run_distils_from_the_dense_model(tmp_path, one_thread):
    """finetune.loss=kd through the whole run: the fine-tuned model ends closer to the dense one
    (KL vs dense, measured by the run) than it was after compression, and closer than the same
    fine-tune on labels (ce), on a tiny random-weight ViT with random labels."""
    from amrc_exp.experiment.run import run
    from tests.conftest import compose_cfg

    base = ["model=deit_t", "model.weights=random", "data=synthetic", "+model.kwargs.depth=1", "model.img_size=32",
            "model.num_classes=10", "ratio=0.6", "calib.num_samples=32", "calib.heldout_samples=16",
            "calib.batch_size=16", "zfit.iters=5", "schedule.iters=20", "finetune.epochs=3", "finetune.lr=1e-3",
            "data.num_train=256", "data.num_val=64", "logger=none", f"cache_dir={tmp_path / 'cache'}"]
    out = run(compose_cfg(base + ["finetune.loss=kd", f"out_dir={tmp_path / 'kd'}"]))
    kl = {stage: out["fidelity"][stage]["kl"] for stage in ("compressed", "finetuned")}
    assert kl["finetuned"] < kl["compressed"], kl
    assert out["config"]["finetune"]["loss"] == "kd"
    ce = run(compose_cfg(base + ["finetune.loss=ce", f"out_dir={tmp_path / 'ce'}"]))
    assert ce["fidelity"]["compressed"]["kl"] == pytest.approx(kl["compressed"], rel=1e-9)  # same start
    assert kl["finetuned"] < ce["fidelity"]["finetuned"]["kl"], (kl, ce["fidelity"])
