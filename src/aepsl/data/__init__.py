"""Datasets: the `folder` format for users' own data, PASCAL VOC, and synthetic data."""

from aepsl.data.datasets import Dataset, Sample, load_dataset

__all__ = ["Dataset", "Sample", "load_dataset"]
