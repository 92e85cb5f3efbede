"""Networks: CAM classifiers for adversarial erasing (stage 1)."""

from aepsl.models.classifier import CamClassifier, build_classifier

__all__ = ["CamClassifier", "build_classifier"]
