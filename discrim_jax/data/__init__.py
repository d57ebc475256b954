"""Data sets: ``cifar100``, ``caltech101`` and the offline ``fashion_mnist``."""

from discrim_jax.data.pipeline import (DATASETS, Dataset, DatasetInfo,
                                       check_labels, get_info, make_iterator,
                                       measure_throughput,
                                       steps_per_epoch, to_global_batch)

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "check_labels", "get_info",
           "make_iterator", "measure_throughput", "steps_per_epoch", "to_global_batch"]
