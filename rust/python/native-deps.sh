#!/usr/bin/env bash
# Installs, from Debian's packages, the C library the extension links when it is missing: the
# system's SQLite (libsqlite3-dev, for the linker's libsqlite3.so), the library Python's `sqlite3`
# runs too. Idempotent; needs root or sudo only when something is missing.
set -euo pipefail

for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib; do
    [ -e "$dir/libsqlite3.so" ] && exit 0
done
pkg-config --exists sqlite3 2>/dev/null && exit 0

as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
echo "installing libsqlite3-dev from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install -y -qq --no-install-recommends libsqlite3-dev >/dev/null \
    || { "${as_root[@]}" apt-get update -qq && \
         "${as_root[@]}" apt-get install -y -qq --no-install-recommends libsqlite3-dev >/dev/null; }
