"""Datasets: split types, batching and downloads (``splits``), the MNIST family (``mnist``), CIFAR-10 (``cifar``)."""

from rankbench.data.splits import DataSplits, Split, default_data_dir, download_file, holdout_split, iterate_batches

__all__ = ["DataSplits", "Split", "default_data_dir", "download_file", "holdout_split", "iterate_batches"]
