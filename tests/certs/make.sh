#!/bin/sh
# Makes the test certificates in this folder (run from here; needs only openssl).
# They are committed: the tests never run this. Regenerate only if they must change.
#   ca.pem / ca.key           a test CA (100 years)
#   server.pem / server.key   localhost, 127.0.0.1, ::1, signed by the CA (100 years)
#   expired.pem / expired.key the same names, signed by the CA, expired in 2020
set -eu
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 36500 \
    -subj "/CN=selsmtp test CA" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"
cat > ext.cnf <<'CNF'
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
CNF
openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=localhost"
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 36500 \
    -extfile ext.cnf -out server.pem
# The expired one: `openssl ca` is the one 3.0 command that takes a start date.
openssl req -newkey rsa:2048 -nodes -keyout expired.key -out expired.csr -subj "/CN=localhost"
mkdir -p ca.db && : > ca.db/index.txt && echo 01 > ca.db/serial
cat > ca.cnf <<'CNF'
[ca]
default_ca = test
[test]
database = ca.db/index.txt
serial = ca.db/serial
new_certs_dir = ca.db
default_md = sha256
policy = any
[any]
commonName = supplied
CNF
openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in expired.csr \
    -startdate 20190101000000Z -enddate 20200101000000Z -extfile ext.cnf -out expired.pem -notext
rm -rf ca.db ca.cnf ext.cnf ./*.csr ./*.srl
