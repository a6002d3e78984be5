#!/usr/bin/env bash
# Make a private certificate authority and one certificate + key for each of the dask scheduler, the
# workers and the client, for a TLS-only (mutually authenticated) dask cluster.
#
# Usage:
#     cluster/make-tls-certs.sh DIR [HOST ...]
#
# DIR (created if needed, mode 700) receives:
#     ca.pem  ca.key                      the authority (keep ca.key off the cluster once certificates exist)
#     scheduler.pem scheduler.key         for `dask scheduler --tls-cert/--tls-key`
#     worker.pem worker.key               for `dask worker --tls-cert/--tls-key`
#     client.pem client.key               for the client (kgrad): tls_client_cert / tls_client_key
# Every file is readable only by its owner (keys 600, certificates 600 too).
#
# Each certificate carries the subjectAltNames DNS:localhost and IP:127.0.0.1, plus every HOST given on
# the command line (an IPv4/IPv6 address becomes an IP: entry, anything else a DNS: entry), so list the
# names or addresses by which clients and workers reach the scheduler on a real cluster.  Every certificate
# is valid both as a TLS server and as a TLS client (dask uses mutual TLS: each side checks the other
# against ca.pem).  Keys are EC P-256; certificates are valid for DAYS days (default 365).
#
# Environment: OPENSSL (default openssl), DAYS (default 365).
set -euo pipefail

if [ $# -lt 1 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
DIR=$1
shift
OPENSSL=${OPENSSL:-openssl}
DAYS=${DAYS:-365}
case $DAYS in ''|*[!0-9]*|0) echo "make-tls-certs: DAYS=$DAYS must be a whole number >= 1" >&2; exit 2;; esac
command -v "$OPENSSL" >/dev/null || { echo "make-tls-certs: '$OPENSSL' not found; install openssl" >&2; exit 1; }

umask 077
mkdir -p "$DIR"
chmod 700 "$DIR"
cd "$DIR"

SAN="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
    case $host in
        *[!0-9.]*) if [[ $host == *:* ]]; then SAN="$SAN,IP:$host"; else SAN="$SAN,DNS:$host"; fi ;;
        *) SAN="$SAN,IP:$host" ;;
    esac
done

newkey() {  # newkey FILE
    "$OPENSSL" genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null
    chmod 600 "$1"
}

# The authority.
newkey ca.key
"$OPENSSL" req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=kgrad dask CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem
chmod 600 ca.pem

EXT=$(mktemp "${TMPDIR:-/tmp}/kgrad-tls-ext.XXXXXX")
trap 'rm -f "$EXT" ./*.csr ca.srl' EXIT
cat >"$EXT" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyAgreement
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$SAN
EOF

for role in scheduler worker client; do
    newkey "$role.key"
    "$OPENSSL" req -new -key "$role.key" -subj "/CN=kgrad dask $role" -out "$role.csr"
    "$OPENSSL" x509 -req -in "$role.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days "$DAYS" \
        -extfile "$EXT" -out "$role.pem" 2>/dev/null
    chmod 600 "$role.pem"
    "$OPENSSL" verify -CAfile ca.pem "$role.pem" >/dev/null
done

echo "make-tls-certs: wrote ca, scheduler, worker and client certificates and keys to $(pwd) (SAN $SAN)"
