#!/usr/bin/env bash
# Install the Debian packages the test suite drives for real: PostgreSQL server binaries (ledger
# backend) and Prometheus with promtool (metrics scrape). Skips what is already present.
set -euo pipefail
need=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian packages start their own services; the tests start throwaway instances instead.
$SUDO systemctl disable --now prometheus postgresql >/dev/null 2>&1 || true
pkill -x prometheus >/dev/null 2>&1 || true
