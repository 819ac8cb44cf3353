"""Deployment credentials: the SuperLink certificate chains to the CA and names its
hosts; SuperNode keys are OpenSSH EC keys; private keys are private."""

from __future__ import annotations

import ipaddress
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from fl.deploy.certs import make_ca, make_node_keys, make_server_cert


def test_server_certificate_is_signed_by_the_ca_for_its_hosts(tmp_path):
    ca_crt, ca_key = make_ca(tmp_path)
    pem, key = make_server_cert(tmp_path, ["localhost", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    server = x509.load_pem_x509_certificate(pem.read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, padding.PKCS1v15(),
                           server.signature_hash_algorithm)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    for private in (ca_key, key):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_supernode_keys_are_openssh_ec_pairs(tmp_path):
    private, public = make_node_keys(tmp_path, "device-00001")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_make_certs_command_writes_everything_a_deployment_needs(tmp_path):
    from experiments import make_certs

    assert make_certs.main(["--out", str(tmp_path), "--hosts", "link.example.org", "10.0.0.5",
                            "--devices", "2"]) == 0
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"ca.crt", "ca.key", "server.pem", "server.key", "device-00000.key",
                     "device-00000.pub", "device-00001.key", "device-00001.pub"}
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # the gateway and the operator reach the loopback-only SuperLink as localhost
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5",
                                                                         "127.0.0.1"]
