#!/usr/bin/env bash
# Installs, from Debian's packages, the servers the tests start on loopback (redis-server,
# PostgreSQL, dnsmasq), never used as services of the machine: each test starts its own on a free
# port; and the headless browser the console's tests drive (chromium, chromium-driver).
# Idempotent; needs root or sudo only when something is missing.
set -euo pipefail

declare -A PACKAGE_OF=([redis-server]=redis-server [chromium]=chromium [chromedriver]=chromium-driver)

missing=()
for binary in "${!PACKAGE_OF[@]}"; do
    command -v "$binary" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$binary]}")
done
# PostgreSQL's server programs live in /usr/lib/postgresql/<version>/bin, not on PATH
# (tests/support/services/postgres.py looks in both places). The package also creates the
# `postgres` user that the tests run the server as when they run as root.
has_postgres() {
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && return 0
    done
    return 1
}
has_postgres || missing+=(postgresql)
# dnsmasq's binary alone (the `dnsmasq` package would also start it as the machine's service);
# it lives in /usr/sbin, which a user's PATH may lack.
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || missing+=(dnsmasq-base)
[ ${#missing[@]} -eq 0 ] && exit 0

as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
echo "installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { "${as_root[@]}" apt-get update -qq && \
         "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
