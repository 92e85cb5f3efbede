"""Stage 3, prohibitive segmentation learning: train a segmentation network on the mined masks."""
