#!/usr/bin/env bash
# Installs what the `mpi` feature (data-parallel training, `--distributed`) needs, from Debian's
# packages: Open MPI (`mpirun`, `libmpi`, `mpicc`) and libclang, with which rsmpi's build
# generates its bindings to MPI. Does nothing when both are there. Needs root (or sudo) and
# apt; on other systems install Open MPI and libclang with their package manager.
set -euo pipefail

have_clang() { ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; }
if command -v mpirun >/dev/null && command -v mpicc >/dev/null && have_clang; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "error: no apt-get here; install Open MPI (mpirun, mpicc) and libclang yourself" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null; then
        sudo="sudo"
    else
        echo "error: installing Open MPI needs root; run this script as root" >&2
        exit 1
    fi
fi
packages=(openmpi-bin libopenmpi-dev libclang-dev)
echo "installing ${packages[*]} (Debian packages, about 150 MB)"
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends "${packages[@]}" >/tmp/install-openmpi.log 2>&1; then
    # A fresh machine may have no package lists yet.
    $sudo apt-get update >>/tmp/install-openmpi.log 2>&1
    $sudo apt-get install -y --no-install-recommends "${packages[@]}" >>/tmp/install-openmpi.log 2>&1 || {
        tail -20 /tmp/install-openmpi.log >&2
        echo "error: apt-get could not install ${packages[*]} (log: /tmp/install-openmpi.log)" >&2
        exit 1
    }
fi
mpirun --version | head -1
