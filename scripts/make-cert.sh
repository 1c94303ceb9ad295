#!/usr/bin/env bash
# A private CA and a server certificate for the node's HTTPS and DICOM TLS ports (also
# its client certificate towards TLS C-MOVE destinations), for a deployment
# without a certificate of its own (compose on one host, a test bench).  A hospital's
# PKI or ACME certificate is better: point PACS_TLS_CERT / PACS_TLS_KEY at it instead.
#
#   scripts/make-cert.sh [FOLDER] [NAME ...]
#
# FOLDER (default ./tls) receives ca.pem + ca.key (the CA: give ca.pem to clients, keep
# ca.key offline), cert.pem + key.pem (PACS_TLS_CERT / PACS_TLS_KEY).  The certificate
# names localhost, 127.0.0.1, ::1, this host's name and every NAME (DNS names or IP
# addresses).  An existing CA is reused, so clients keep trusting it; the server
# certificate is made anew.  EC P-256 keys, valid 825 days (the most clients accept).
set -euo pipefail

folder=${1:-./tls}
shift || true
days=825
mkdir -p "$folder"
cd "$folder"
umask 077

names="DNS:localhost,IP:127.0.0.1,IP:::1"
host=$(hostname 2>/dev/null || true)
if [ -n "$host" ] && [ "$host" != localhost ]; then
    names="$names,DNS:$host"
fi
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
        names="$names,IP:$name"
    else
        names="$names,DNS:$name"
    fi
done

if [ ! -s ca.pem ] || [ ! -s ca.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days 3650 -subj "/CN=pacs private CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

cat > server.ext <<EXT
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=$names
EXT
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout key.pem -out server.csr -subj "/CN=${host:-localhost}" 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
    -out cert.pem -days "$days" -extfile server.ext 2>/dev/null
rm -f server.csr server.ext
chmod 600 ca.key key.pem
chmod 644 ca.pem cert.pem
echo "wrote $(pwd)/cert.pem and key.pem (PACS_TLS_CERT, PACS_TLS_KEY) for $names"
echo "clients trust $(pwd)/ca.pem"
