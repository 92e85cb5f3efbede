"""Input statistics of pretrained weights: images arrive in [0, 1] and each network's first
layer normalises them with the statistics its backbone's weights were trained with."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
