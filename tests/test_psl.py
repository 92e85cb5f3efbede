"""The PSL objective: prohibitive mask, squared classification loss, masked cross-entropy."""

import pytest
import torch
import torch.nn.functional as F

from aepsl.psl.loss import classification_loss, prohibitive_mask, psl_loss, segmentation_loss


def scores_favouring(klass: int, value: float = 50.0, classes: int = 4) -> torch.Tensor:
    scores = torch.zeros(1, classes, 2, 2)
    scores[:, klass] = value
    return scores


def test_absent_class_never_wins_even_with_huge_scores():
    for value in (50.0, 1e4):  # 1e4: the background softmax underflows to exactly 0
        mask = prohibitive_mask(
            scores_favouring(2, value), torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.0]])
        )
        assert torch.all(mask == 0)


def test_background_is_always_allowed():
    mask = prohibitive_mask(scores_favouring(0), torch.zeros(1, 3), torch.zeros(1, 3))
    assert torch.all(mask == 0)


def test_present_class_with_zero_confidence_cannot_win():
    mask = prohibitive_mask(
        scores_favouring(1, 1e4), torch.tensor([[0.0, 1.0, 1.0]]), torch.ones(1, 3)
    )
    assert torch.all(mask != 1)


def test_confident_present_class_with_highest_score_wins():
    labels = torch.tensor([[0.0, 1.0, 0.0]])
    mask = prohibitive_mask(scores_favouring(2), torch.tensor([[0.3, 1.0, 0.9]]), labels)
    assert torch.all(mask == 2)


def test_confidence_weights_the_scores():
    scores = torch.zeros(1, 3, 1, 1)
    scores[0, 0], scores[0, 1] = 1.0, 1.5  # f_1 > f_0, but 0.2 * f_1 < f_0
    labels = torch.tensor([[1.0, 1.0]])
    assert prohibitive_mask(scores, torch.tensor([[0.2, 1.0]]), labels).item() == 0
    assert prohibitive_mask(scores, torch.tensor([[1.0, 1.0]]), labels).item() == 1


def test_classification_loss_by_hand():
    logits = torch.tensor([[0.0, 100.0], [-100.0, 0.0]])  # sigmoid: [[0.5, 1], [0, 0.5]]
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # per image: 0.25 + 0 and 0 + 0.25, mean 0.25
    assert classification_loss(logits, labels).item() == pytest.approx(0.25)


def test_segmentation_loss_ignores_255():
    scores = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0] = 255
    labelled = target != 255
    expected = F.cross_entropy(scores.permute(0, 2, 3, 1)[labelled], target[labelled])
    assert segmentation_loss(scores, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_segmentation_loss_upsamples_scores_to_the_labels():
    scores = torch.randn(1, 3, 4, 4)
    target = torch.randint(0, 3, (1, 32, 32))
    up = F.interpolate(scores, size=(32, 32), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, target)
    assert segmentation_loss(scores, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_all_ignored_target_gives_zero_loss_with_gradient():
    scores = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(scores, torch.full((1, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(scores.grad == 0)


def test_psl_loss_parts_and_ablation():
    scores = torch.randn(2, 3, 4, 4)
    logits = torch.randn(2, 2)
    pseudo = torch.randint(0, 3, (2, 32, 32))
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    total, parts = psl_loss(scores, logits, pseudo, labels)
    assert set(parts) == {"cls", "seg", "psl", "total"}
    assert parts["total"] == pytest.approx(parts["cls"] + parts["seg"] + parts["psl"], rel=1e-5)
    assert total.item() == pytest.approx(parts["total"])
    alone, parts = psl_loss(scores, logits, pseudo, labels, use_psl=False)
    assert set(parts) == {"cls", "seg", "total"}
    assert alone.item() == pytest.approx(parts["cls"] + parts["seg"], rel=1e-5)


def test_no_gradient_flows_through_the_mask():
    # With no pseudo labels and nothing to classify, only CE(f, S_hat) remains: its gradient
    # is the plain cross-entropy gradient for the fixed target S_hat, none through argmax.
    scores = torch.randn(1, 3, 4, 4, requires_grad=True)
    logits = torch.randn(1, 2, requires_grad=True)
    labels = torch.ones(1, 2)
    total, _ = psl_loss(scores, logits, torch.full((1, 4, 4), 255), labels)
    total.backward()
    mask = prohibitive_mask(scores, torch.sigmoid(logits), labels)
    reference = scores.detach().clone().requires_grad_()
    F.cross_entropy(reference, mask).backward()
    assert torch.allclose(scores.grad, reference.grad, atol=1e-6)
    cls_only = torch.autograd.grad(classification_loss(logits, labels), logits)[0]
    assert torch.allclose(logits.grad, cls_only)  # nu reaches the loss only through cls
