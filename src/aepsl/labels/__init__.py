"""Stage 2: pseudo-label construction (mined regions, saliency, masks)."""
