"""Data sets: the paper's, the offline ``fashion_mnist``, any TFDS name, an
image folder; in memory or streamed."""

from discrim_jax import _app

_app.require(__name__)

from discrim_jax.data.pipeline import (DATASETS, Dataset, DatasetInfo,
                                       check_labels, get_info, make_iterator,
                                       measure_throughput, parse_holdout,
                                       steps_per_epoch, to_global_batch)

__all__ = ["DATASETS", "Dataset", "DatasetInfo", "check_labels", "get_info",
           "make_iterator", "measure_throughput", "parse_holdout",
           "steps_per_epoch", "to_global_batch"]
