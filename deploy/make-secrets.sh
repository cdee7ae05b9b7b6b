#!/bin/sh
# Create the secret files deploy/compose.yaml mounts, under deploy/secrets/ (gitignored):
#
#   idgate_keys.json     pseudonymisation keys        (idgate keys generate)    IDGATE_KEY_FILE
#   idgate_ledger.key    Ed25519 ledger signing key   (idgate keys ledger-key)  IDGATE_LEDGER_KEY_FILE
#   postgres_password    the PostgreSQL password      (random)                  POSTGRES_PASSWORD_FILE
#   pgpass               the same password for libpq  (PGPASSFILE)              DATABASE_URL has none
#
# Usage:  deploy/make-secrets.sh TENANT [TENANT...]
#   IDGATE=".venv/bin/idgate"                 the CLI to use (default: idgate on PATH, else .venv/bin/idgate)
#   IDGATE="docker run --rm idgate:local"     or the image itself (it only prints to stdout here)
#
# Existing files are never overwritten: losing the key file gives everyone new pseudonyms,
# losing the ledger key breaks the signature chain. Back them up. To rotate pseudonymisation
# keys later: idgate keys generate --tenant T --out deploy/secrets/idgate_keys.json
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 TENANT [TENANT...]   (the tenant ids of your idgate.toml)" >&2
    exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
dir="$here/secrets"
if [ -z "${IDGATE:-}" ]; then
    if command -v idgate >/dev/null 2>&1; then
        IDGATE=idgate
    elif [ -x "$here/../.venv/bin/idgate" ]; then
        IDGATE="$here/../.venv/bin/idgate"
    else
        echo "no idgate CLI found: set IDGATE (see the header of $0)" >&2
        exit 2
    fi
fi

umask 077
mkdir -p "$dir"

# Write stdin to $1 only if it does not exist yet (via a temporary file: no half files).
create() {
    target="$dir/$1"
    if [ -e "$target" ]; then
        echo "keep    $target (exists)"
        cat >/dev/null
        return
    fi
    cat >"$target.tmp"
    if [ ! -s "$target.tmp" ]; then
        rm -f "$target.tmp"
        echo "failed  $target (empty output)" >&2
        exit 1
    fi
    mv "$target.tmp" "$target"
    echo "created $target"
}

tenant_args=""
for t in "$@"; do
    tenant_args="$tenant_args --tenant $t"
done

# IDGATE may be a command with arguments and tenant ids have no spaces: split on purpose.
# shellcheck disable=SC2086
if [ -e "$dir/idgate_keys.json" ]; then
    echo "keep    $dir/idgate_keys.json (exists)"
else
    $IDGATE keys generate $tenant_args | create idgate_keys.json
fi
if [ -e "$dir/idgate_ledger.key" ]; then
    echo "keep    $dir/idgate_ledger.key (exists)"
else
    $IDGATE keys ledger-key | create idgate_ledger.key
fi

if [ ! -e "$dir/postgres_password" ]; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | create postgres_password
fi
password=$(cat "$dir/postgres_password")
# host:port:database:user:password, matching DATABASE_URL in compose.yaml
printf 'postgres:5432:idgate:idgate:%s\n' "$password" | create pgpass

# The containers run as uid/gid 10001 and compose bind-mounts these files as they are, so
# they must be readable by 10001. libpq ignores a pgpass file that group or others can read.
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$dir"/idgate_keys.json "$dir"/idgate_ledger.key "$dir"/pgpass "$dir"/postgres_password
    chmod 0600 "$dir"/*
    echo "owner set to 10001:10001 (mode 0600)"
else
    echo
    echo "now give the files to the container user (uid 10001), keeping mode 0600:"
    echo "  sudo chown 10001:10001 $dir/*"
fi
