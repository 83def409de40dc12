#!/usr/bin/env bash
# Create .venv on the fastest Python 3.11 the machine has.
#
# Debian's /usr/bin/python3.11 runs this project's Python 1.3-1.5x faster than the pyenv build that is
# the machine's default python3 (see docs/performance.md), but Debian ships it without ensurepip
# (that is the python3.11-venv package). So: make the venv without pip, then bootstrap pip into it
# with any pip that can target another interpreter (pip >= 22.3, `--python`). If none of that works,
# fall back to an ordinary venv of whatever python3.11 is on PATH.
set -euo pipefail
venv=${1:-.venv}
deb=/usr/bin/python3.11
if [ -x "$deb" ]; then
    if "$deb" -c 'import ensurepip' 2>/dev/null; then
        "$deb" -m venv "$venv" && exit 0
    elif "$deb" -m venv --without-pip "$venv"; then
        for pip_host in python3.11 python3; do
            if command -v "$pip_host" >/dev/null && "$pip_host" -m pip --python "$venv/bin/python" \
                    install -q --disable-pip-version-check pip >/dev/null 2>&1 \
                    && [ -x "$venv/bin/pip" ]; then
                exit 0
            fi
        done
        echo "make-venv: could not bootstrap pip into a $deb venv; using python3.11 from PATH" >&2
        rm -rf "$venv"
    fi
fi
python3.11 -m venv "$venv" || python3 -m venv "$venv"
