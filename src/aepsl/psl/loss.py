"""The PSL objective, as pure functions on tensors.

L = sum_c (nu_c - y_c)^2 + CE(f, S) + CE(f, S_hat), with S the pseudo labels of adversarial
erasing (255 ignored) and S_hat the online prohibitive mask: each pixel's class among
background and the image's classes, the class scores weighted by the classifier's confidence nu.

Resolution: the scores are upsampled bilinearly to the label size before every term (DeepLab
downsampled the labels instead; upsampling the scores loses no labelled pixel), and S_hat is
computed from those same upsampled scores, so both cross-entropies see one score map.

Padding: pixels a training crop pads (outside the rescaled image; `valid` False) belong to no
image and are excluded from both cross-entropies: S is 255 there already, and S_hat is set to
255 there, so CE(f, S_hat) is a mean over the image's pixels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aepsl.labelmap import IGNORE


def upsample_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, K, h, w) scores bilinearly resized to `size`; unchanged if already that size."""
    if tuple(scores.shape[-2:]) == tuple(size):
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def prohibitive_mask(scores: torch.Tensor, nu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """S_hat (N, h, w) = argmax_c w_c * softmax(scores)_c, w_0 = 1, w_c = nu_c * y_c.

    Computed in log space, log w_c + log f_c: the argmax is the same, but a prohibited class
    (absent from the image, or nu_c = 0) scores -inf and so can never win, not even a tie
    against a background probability that underflowed to 0. No gradient flows through S_hat.
    """
    with torch.no_grad():
        weights = torch.cat([torch.ones_like(nu[:, :1]), nu * (labels > 0)], dim=1).float()
        weighted = F.log_softmax(scores.float(), dim=1) + weights.log()[:, :, None, None]
        return weighted.argmax(dim=1)


def exclude_padding(target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """`target` with the padded pixels (`valid` False) set to IGNORE; unchanged when `valid` is
    None (nothing padded)."""
    if valid is None:
        return target
    return target.masked_fill(~valid.to(device=target.device, dtype=torch.bool), IGNORE)


def classification_loss(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_c (sigmoid(logit_c) - y_c)^2, averaged over the batch (the paper's squared loss)."""
    nu = torch.sigmoid(class_logits.float())
    return ((nu - labels.float()) ** 2).sum(dim=1).mean()


def segmentation_loss(
    scores: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE
) -> torch.Tensor:
    """Cross-entropy of (N, K, h, w) scores against (N, H, W) labels, mean over the labelled
    pixels; scores are upsampled to the label size first. 0 (with gradient) if none is labelled.
    """
    target = target.long()
    scores = upsample_scores(scores, tuple(target.shape[-2:]))
    total = F.cross_entropy(scores.float(), target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().clamp(min=1)


def psl_loss(
    scores: torch.Tensor,
    class_logits: torch.Tensor,
    pseudo_labels: torch.Tensor,
    image_labels: torch.Tensor,
    use_psl: bool = True,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PSL loss and its parts as floats for logging ("cls", "seg", "psl", "total").
    `valid` (N, H, W) bool marks the crop's real pixels; padding (False) counts in neither
    cross-entropy. None: every pixel is real.

    use_psl=False is the paper's "pseudo labels alone" ablation: the S_hat term (and its "psl"
    entry) is dropped, but the classification branch still trains, since it costs nothing and
    lets prediction weight scores by nu; the S_hat term is what PSL adds.
    """
    scores = upsample_scores(scores, tuple(pseudo_labels.shape[-2:]))
    parts = {
        "cls": classification_loss(class_logits, image_labels),
        "seg": segmentation_loss(scores, exclude_padding(pseudo_labels, valid)),
    }
    if use_psl:
        mask = prohibitive_mask(scores, torch.sigmoid(class_logits), image_labels)
        parts["psl"] = segmentation_loss(scores, exclude_padding(mask, valid))
    total = torch.stack(list(parts.values())).sum()
    values = torch.stack([*parts.values(), total]).detach().tolist()  # one device sync
    return total, dict(zip([*parts, "total"], values, strict=True))
