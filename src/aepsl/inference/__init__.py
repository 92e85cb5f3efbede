"""Stage 3 inference: turning segmentation scores into label maps (dense CRF)."""
