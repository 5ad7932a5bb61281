"""Partial fine-tuning's losses: the distillation term against a float64 closed form, a teacher
equal to the student leaves the weights untouched, distillation pulls a student towards its
teacher, feature matching against a hand computation and pulling the compressed layer's output
towards the dense one, and the run keeps a dense teacher only when the loss needs one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from amrc_exp.compress.finetune import FinetuneLoss, capture_outputs, distill_kl, feature_mismatch, partial_finetune
from amrc_exp.compress.lowrank import LayerPlan, LowRankLinear


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


def _loader(n: int = 64, mean: float = 0.0):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 6, generator=g) + mean, torch.randint(0, 3, (n,), generator=g)
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


def test_feature_mismatch_matches_a_hand_computation():
    g = torch.Generator().manual_seed(4)
    own = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, 5, generator=g)}
    dense = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(2, 5, generator=g)}

    def ratio(s, t) -> float:  # sum of squared differences over sum of squares, plain float64 loops
        num = sum((a - b) ** 2 for ra, rb in zip(s.double().tolist(), t.double().tolist()) for a, b in zip(ra, rb))
        return num / sum(b ** 2 for rb in t.double().tolist() for b in rb)

    expected = (ratio(own["a"], dense["a"]) + ratio(own["b"], dense["b"])) / 2
    assert feature_mismatch(own, dense).item() == pytest.approx(expected, rel=1e-5)
    assert feature_mismatch(dense, dense).item() == 0.0


def test_capture_outputs_records_each_forward_and_removes_its_hooks():
    net = _Net()
    x = torch.randn(5, 6)
    with capture_outputs(net, ["body"]) as out:
        net(x)
        torch.testing.assert_close(out["body"], x @ net.body.weight.T + net.body.bias)
    assert not net.body._forward_hooks
    with pytest.raises(ValueError, match="no module 'missing'"):
        with capture_outputs(net, ["missing"]):
            pass


def _rank1(dense: _Net) -> _Net:
    """`dense` with its body replaced by its best rank-1 approximation (a LowRankLinear)."""
    student = _Net()
    student.load_state_dict(dense.state_dict())
    w = dense.body.weight.detach()
    u, s, vh = torch.linalg.svd(w)
    plan = LayerPlan("body", down=s[:1, None] * vh[:1], up=u[:, :1], bias=dense.body.bias.detach().clone())
    student.body = LowRankLinear.from_plan(plan)
    torch.testing.assert_close(student.body.dense_weight().detach(), s[0] * torch.outer(u[:, 0], vh[0]))
    return student


@pytest.mark.parametrize("weight", [0.0, 50.0])
def test_feature_matching_pulls_the_compressed_layer_towards_the_dense_one(weight):
    """Partial fine-tuning trains the body's bias; with feature matching its output ends closer to
    the dense layer's (measured here, by hand) than the same KD fine-tune without it. Inputs with a
    mean give the rank-1 residual a mean the bias can absorb."""
    torch.manual_seed(0)
    teacher = _Net()
    x = torch.cat([b[0] for b in _loader(mean=2.0)])

    def body_gap(student) -> float:
        with torch.no_grad():
            return float((student.body(x) - teacher.body(x)).pow(2).sum() / teacher.body(x).pow(2).sum())

    gaps = {}
    for w in (0.0, weight):
        student = _rank1(teacher)
        start = body_gap(student)
        partial_finetune(student, _loader(mean=2.0), epochs=10, lr=2e-2, weight_decay=0.0,
                         device=torch.device("cpu"), loss=FinetuneLoss("kd", temperature=1.0, feature_weight=w),
                         teacher=teacher)
        gaps[w] = body_gap(student)
        assert not student.body._forward_hooks and not teacher.body._forward_hooks
    if weight:
        assert gaps[weight] < 0.7 * gaps[0.0] and gaps[weight] < 0.6 * start, (start, gaps)


def test_feature_matching_needs_a_teacher():
    with pytest.raises(ValueError, match="teacher"):
        partial_finetune(_Net(), _loader(), epochs=1, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"),
                         loss=FinetuneLoss("ce", feature_weight=1.0))
    with pytest.raises(ValueError, match="feature_weight"):
        FinetuneLoss("kd", feature_weight=-1.0)
