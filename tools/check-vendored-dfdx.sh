#!/usr/bin/env bash
# Prints every difference between vendor/dfdx and dfdx 0.13.0 as published on crates.io (after
# checking the download's sha256), so that a review can confirm the patch is only what
# vendor/dfdx/PATCHED.md lists. Needs curl and network access to static.crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
want=c6dbcb8a7363d8b434ca20bd3808ab9f6ee77e6916ca1d511f8e3c725d0b340e
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL https://static.crates.io/crates/dfdx/dfdx-0.13.0.crate -o "$tmp/dfdx.crate"
got=$(sha256sum "$tmp/dfdx.crate" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "error: dfdx-0.13.0.crate has sha256 $got, not $want" >&2
  exit 1
fi
tar -xzf "$tmp/dfdx.crate" -C "$tmp"
# The published sources use CRLF line endings; so does the vendored copy.
diff -ru "$tmp/dfdx-0.13.0/src" vendor/dfdx/src || true
diff -u "$tmp/dfdx-0.13.0/build.rs" vendor/dfdx/build.rs && echo "build.rs: unchanged"
