"""The ``http://`` store backend behind TLS: which certificates a runner trusts.

docs/server.md promises that a runner verifies an ``https://`` server against the system's CA
store, or the bundle ``SSL_CERT_FILE`` names (where a company CA goes). The server here is a
real TLS socket with a certificate from a CA made for the test, answering every request as a
stickyci server answers a missing blob.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stickyci.errors import NotFound, StoreUnavailable
from stickyci.store.http import HttpBackend


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          signer: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(signer, hashes.SHA256())


class _Missing(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"error": "no such object"}'
        self.send_response(404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An https URL on 127.0.0.1 and the PEM of the CA that signed its certificate."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("stickyci test CA", ca_key, x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "stickyci test CA")]), ca_key, ca=True)
    leaf = _cert("127.0.0.1", key, ca.subject, ca_key, ca=False)
    ca_pem, chain = tmp_path / "ca.pem", tmp_path / "server.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Missing)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca_pem
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_signed_by_the_ca_in_ssl_cert_file_is_trusted(
        tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(NotFound, match="refs/nothing is missing"):
        HttpBackend(url, "sci_token").get("refs/nothing")


def test_a_server_signed_by_an_unknown_ca_is_refused(
        tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = tls_server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        HttpBackend(url, "sci_token").get("refs/nothing")
