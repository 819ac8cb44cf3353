"""TLS and SuperNode credentials for a real deployment, made with ``cryptography``.

A deployment needs three kinds of material (docs/deployment.md):

* a **certificate authority** (``ca.crt``, ``ca.key``): every SuperNode and the
  ``flwr`` CLI trust the SuperLink because its certificate is signed by this CA;
* the **SuperLink's certificate** (``server.pem``, ``server.key``), valid for the
  host names and addresses SuperNodes dial;
* one **EC key pair per SuperNode** (``<name>.key``, ``<name>.pub``, OpenSSH
  format, as ``ssh-keygen -t ecdsa -b 384`` writes): with SuperNode
  authentication on, only SuperNodes whose public key was registered
  (``flwr supernode register``) may join.

Private keys are written with mode 0600. Keep ``ca.key`` off the SuperLink host in
production; the demo keeps everything in one directory for convenience.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedface"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(folder: str | Path) -> tuple[Path, Path]:
    """A self-signed CA: (``ca.crt``, ``ca.key``)."""
    folder = Path(folder)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("fedface CA"))
            .issuer_name(_name("fedface CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return (_write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM)),
            _write(folder / "ca.key", _pem_key(key), private=True))


def make_server_cert(folder: str | Path, hosts: list[str]) -> tuple[Path, Path]:
    """The SuperLink's certificate for ``hosts`` (names or IPs), signed by the CA in
    ``folder``: (``server.pem``, ``server.key``)."""
    folder = Path(folder)
    ca_cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (_write(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
            _write(folder / "server.key", _pem_key(key), private=True))


def make_node_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format: (``<name>.key``, ``<name>.pub``)."""
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return (_write(folder / f"{name}.key", private, private=True),
            _write(folder / f"{name}.pub", public + b"\n"))
