#!/usr/bin/env bash
# Installs ray, redis (client), nixl + nixl-cu13 and a bundled redis-server on the GPU machine, which has no
# network, from the bundle parts in .devpkg/ (ignored by git; built by scripts/device_bundle/build.sh and
# carried into the working copy call by call: name each .devpkg/part-* and .devpkg/MANIFEST in `carry`).
#
#   bash scripts/device_install.sh stash     copy the .devpkg/part-* present here (and MANIFEST) to /tmp/devpkg
#   bash scripts/device_install.sh install   stash, check every part in MANIFEST by sha256, unpack into
#                                            /tmp/site (site-packages) and /tmp/redis-bin, and print the exports
#
# `install` prints only the export lines on stdout (logs go to stderr), so use it as
#   eval "$(bash scripts/device_install.sh install)"
# It is idempotent: a finished install of the same MANIFEST is not unpacked again. It ends by importing
# ray, redis, yaml, msgpack and nixl with python3 (DEVPKG_NO_IMPORT_CHECK=1 skips that, for a dry run elsewhere).
set -euo pipefail

SRC=.devpkg
STASH=/tmp/devpkg
SITE=/tmp/site
RBIN=/tmp/redis-bin

log() { echo "device_install: $*" >&2; }

stash() {
    mkdir -p "$STASH"
    local f n=0
    for f in "$SRC"/part-* "$SRC"/MANIFEST; do
        [ -f "$f" ] || continue
        cp -f "$f" "$STASH/"
        n=$((n + 1))
    done
    log "stashed $n file(s) into $STASH: $(cd "$STASH" && ls part-* MANIFEST 2>/dev/null | tr '\n' ' ')"
}

print_exports() {
    echo "export PYTHONPATH=$SITE:$PWD\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export PATH=$RBIN:\$PATH"
}

# Drops the bundled copies of small pure dependencies (typing_extensions, packaging, requests, ...) that the
# machine's own Python already has in a version the bundled packages accept, so /tmp/site, being first on
# PYTHONPATH, does not shadow the machine's versions. ray, redis, nixl and nixl-cu13 are always kept.
prune() {
    python3 - "$1" <<'PY'
import os, shutil, sys, importlib.metadata as md
site = os.path.abspath(sys.argv[1])
base = [p for p in sys.path if p and os.path.abspath(p) != site]
sys.path.insert(0, site)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
keep = {"ray", "redis", "nixl", "nixl-cu13"}
bundled = {canonicalize_name(d.metadata["Name"]): d for d in md.distributions(path=[site])}
specs = {}
for d in bundled.values():
    for r in d.requires or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            specs.setdefault(canonicalize_name(req.name), []).append(req.specifier)
present = {}
for d in md.distributions(path=base):
    present.setdefault(canonicalize_name(d.metadata["Name"]), d.version)
dropped, kept = [], []
for name, d in sorted(bundled.items()):
    ok = name not in keep and name in present
    if ok:
        try:
            v = Version(present[name])
            ok = all(s.contains(v, prereleases=True) for s in specs.get(name, []))
        except InvalidVersion:
            ok = False
    if not ok:
        kept.append(f"{name}=={d.version}")
        continue
    for f in d.files or []:
        p = os.path.normpath(os.path.join(site, f))
        if p.startswith(site + os.sep) and os.path.isfile(p):
            os.remove(p)
    shutil.rmtree(str(d._path), ignore_errors=True)  # the .dist-info folder, INSTALLER included
    dropped.append(f"{name} (have {present[name]})")
for root, dirs, files in os.walk(site, topdown=False):
    if root != site and not os.listdir(root):
        os.rmdir(root)
print("device_install: bundled, kept: " + ", ".join(kept), file=sys.stderr)
print("device_install: already on the machine, not bundled in: " + (", ".join(dropped) or "none"), file=sys.stderr)
PY
}

install() {
    stash
    [ -f "$STASH/MANIFEST" ] || { log "no MANIFEST in $STASH (carry .devpkg/MANIFEST)"; exit 1; }
    local stamp
    stamp=$(sha256sum "$STASH/MANIFEST" | cut -d' ' -f1)
    if [ -f "$SITE/.installed" ] && [ "$(cat "$SITE/.installed")" = "$stamp" ] && [ -x "$RBIN/redis-server" ]; then
        log "already installed in $SITE and $RBIN"
        print_exports
        return
    fi
    local parts missing=""
    parts=$(awk '{print $2}' "$STASH/MANIFEST")
    for p in $parts; do [ -f "$STASH/$p" ] || missing="$missing $p"; done
    if [ -n "$missing" ]; then
        log "missing part(s):$missing: carry them (with MANIFEST) and run '$0 stash' first"
        exit 1
    fi
    (cd "$STASH" && sha256sum --quiet -c MANIFEST) >&2 || { log "sha256 mismatch: re-carry the parts"; exit 1; }
    local tmp="$STASH/unpack"
    rm -rf "$tmp" "$SITE" "$RBIN"
    mkdir -p "$tmp"
    log "unpacking $(echo $parts | wc -w) part(s)"
    (cd "$STASH" && cat $parts) | tar -xJ -C "$tmp"
    prune "$tmp/site"
    mv "$tmp/site" "$SITE"
    mv "$tmp/redis-bin" "$RBIN"
    rm -rf "$tmp"
    "$RBIN/redis-server" --version >&2
    [ -n "${DEVPKG_NO_IMPORT_CHECK:-}" ] || (cd / && PYTHONPATH="$SITE" python3 -c "
import ray, redis, yaml, msgpack, nixl
print('device_install: imports ok: ray', ray.__version__, 'redis', redis.__version__, 'nixl', nixl.__name__,
      'backend', nixl._api.__name__.split('.')[0])" >&2)
    echo "$stamp" > "$SITE/.installed"
    log "installed"
    print_exports
}

case "${1:-}" in
    stash) stash ;;
    install) install ;;
    *) echo "usage: bash scripts/device_install.sh stash|install" >&2; exit 2 ;;
esac
