"""Credentials of a secure deployment (fedengines/credentials.py, `python deploy.py certs`) and the checks that turn
a wrong one into one line: files and modes, the chain and names, and a probe of a SuperLink stand-in (a TLS or
plaintext socket server on 127.0.0.1, in this process) for each way a node can disagree with it."""
import datetime
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedengines import credentials, flower_cli
from fedengines.credentials import CredentialError, check_node_key, check_server_files, make_credentials, probe_superlink
from helpers import ROOT


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_certs_writes_each_file_with_its_mode_and_a_chain_that_verifies(tmp_path):
    made = make_credentials(tmp_path / "c", hosts=["10.0.0.5", "link.example.org"], nodes=2)
    c = tmp_path / "c"
    assert {_mode(c / "ca.key"), _mode(made["superlink"][1])} == {0o600}
    assert {_mode(c / "ca.crt"), _mode(made["superlink"][0])} == {0o644}
    assert sorted(made["nodes"]) == ["site0", "site1"]
    for key, pub in made["nodes"].values():
        assert _mode(key) == 0o600 and _mode(pub) == 0o644
        check_node_key(key)  # what flower-supernode reads: OpenSSH, ECDSA P-384
        assert pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    check_server_files(c / "ca.crt", *made["superlink"], hosts=["10.0.0.5", "link.example.org", "127.0.0.1"])
    srv = x509.load_pem_x509_certificate(made["superlink"][0].read_bytes())
    sans = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(a) for a in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert set(sans.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}


def test_more_sites_join_under_the_same_ca_and_nothing_is_overwritten(tmp_path):
    c = tmp_path / "c"
    make_credentials(c, hosts=["127.0.0.1"], nodes=1)
    ca = (c / "ca.crt").read_bytes()
    made = make_credentials(c, nodes=2, names=["hospital"])
    assert sorted(made["nodes"]) == ["hospital", "site1", "site2"] and (c / "ca.crt").read_bytes() == ca
    with pytest.raises(CredentialError, match="'site0' is already enrolled"):
        make_credentials(c, names=["site0"])
    with pytest.raises(CredentialError, match="already holds a CA"):
        make_credentials(c, hosts=["x"])
    with pytest.raises(CredentialError, match="give --host"):
        make_credentials(tmp_path / "new", nodes=1)


def test_a_wrong_server_file_is_named(tmp_path):
    a = make_credentials(tmp_path / "a", hosts=["127.0.0.1"])
    b = make_credentials(tmp_path / "b", hosts=["127.0.0.1"])
    with pytest.raises(CredentialError, match=r"^--ssl-certfile: .*/b/superlink/server.crt is not signed by the CA"):
        check_server_files(a["ca"], *b["superlink"])
    with pytest.raises(CredentialError, match=r"^--ssl-keyfile: .*/b/superlink/server.key is not the key of"):
        check_server_files(a["ca"], a["superlink"][0], b["superlink"][1])
    with pytest.raises(CredentialError, match=r"does not name 10\.1\.2\.3 .*issue it with --host 10\.1\.2\.3"):
        check_server_files(a["ca"], *a["superlink"], hosts=["10.1.2.3"])
    with pytest.raises(CredentialError, match=r"^--ssl-keyfile: .*/missing does not exist"):
        check_server_files(a["ca"], a["superlink"][0], tmp_path / "missing")


def test_a_node_key_that_is_missing_open_to_others_or_of_another_kind_is_named(tmp_path):
    key = make_credentials(tmp_path / "c", hosts=["127.0.0.1"], nodes=1)["nodes"]["site0"][0]
    with pytest.raises(CredentialError, match=r"^--auth-supernode-private-key: .*/nope does not exist"):
        check_node_key(tmp_path / "nope")
    os.chmod(key, 0o644)
    with pytest.raises(CredentialError, match=rf"readable by other users: chmod 600 {key}$"):
        check_node_key(key)
    pem = tmp_path / "pem"
    pem.write_bytes((tmp_path / "c" / "ca.key").read_bytes())  # a PEM EC key: not what Flower reads
    os.chmod(pem, 0o600)
    with pytest.raises(CredentialError, match="is not an unencrypted OpenSSH private key"):
        check_node_key(pem)


@contextmanager
def _server(crt=None, key=None):
    """A stand-in SuperLink on 127.0.0.1: TLS with crt/key, else plaintext (answers like an HTTP server)."""
    sock = socket.create_server(("127.0.0.1", 0))
    ctx = None
    if crt:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except (socket.timeout, OSError):
                continue
            try:
                if ctx:
                    conn.settimeout(5)
                    with ctx.wrap_socket(conn, server_side=True):
                        pass
                else:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except (ssl.SSLError, OSError):
                pass
            finally:
                conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        sock.close()


def test_the_probe_names_what_a_node_would_disagree_with(tmp_path):
    a = make_credentials(tmp_path / "a", hosts=["127.0.0.1"])
    other = make_credentials(tmp_path / "b", hosts=["127.0.0.1"])
    with _server(*a["superlink"]) as link:
        probe_superlink(link, a["ca"])  # the right CA: passes
        with pytest.raises(CredentialError, match=rf"^--root-certificates: {other['ca']} did not sign the certificate"):
            probe_superlink(link, other["ca"])
        with pytest.raises(CredentialError, match=rf"^--superlink {link} speaks TLS: give --root-certificates"):
            probe_superlink(link, None)  # a plaintext node
    with _server() as link:
        probe_superlink(link, None)  # plaintext to plaintext: passes
        with pytest.raises(CredentialError, match=rf"^--superlink {link} does not speak TLS"):
            probe_superlink(link, a["ca"])
    ca = x509.load_pem_x509_certificate(a["ca"].read_bytes())
    ca_key = serialization.load_pem_private_key((tmp_path / "a" / "ca.key").read_bytes(), None)
    then = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = credentials.issue_server_certificate(tmp_path / "old", ca, ca_key, ["127.0.0.1"], days=1, not_before=then)
    with _server(*expired) as link:
        with pytest.raises(CredentialError, match=r"certificate has expired: issue it anew"):
            probe_superlink(link, a["ca"])
    elsewhere = credentials.issue_server_certificate(tmp_path / "else", ca, ca_key, ["10.9.9.9"], loopback=False)
    with _server(*elsewhere) as link:
        with pytest.raises(CredentialError, match=r"does not name 127\.0\.0\.1: issue it with --host 127\.0\.0\.1"):
            probe_superlink(link, a["ca"])
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    probe_superlink(f"127.0.0.1:{port}", a["ca"])  # nobody listening yet: Flower's retries take it


def test_the_version_guard_names_the_version_and_the_flag():
    with pytest.raises(flower_cli.FlowerVersionError,
                       match=rf"^flwr {flower_cli.flower_version()}: `flower-superlink` has no --appio-ssl-certfile"):
        flower_cli.check_flags({("flower-superlink",): ("--ssl-certfile", "--appio-ssl-certfile")})
    flower_cli.check_installed()  # every flag the package passes exists in the pinned Flower


def test_deploy_certs_is_one_command(tmp_path):
    p = subprocess.run([sys.executable, "deploy.py", "certs", str(tmp_path / "c"), "--host", "127.0.0.1", "--nodes",
                        "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "flwr supernode register" in p.stdout and (tmp_path / "c" / "supernodes" / "site1" / "key").is_file()
    p = subprocess.run([sys.executable, "deploy.py", "certs", str(tmp_path / "c"), "--host", "x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "already holds a CA" in p.stderr
    check = [sys.executable, "deploy.py", "certs", str(tmp_path / "c"), "--check", "--host", "127.0.0.1"]
    p = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "2 site key(s) check out" in p.stdout, p.stderr
    os.chmod(tmp_path / "c" / "supernodes" / "site1" / "key", 0o640)
    p = subprocess.run(check[:-1] + ["10.0.0.9"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "does not name 10.0.0.9" in p.stderr  # the first thing wrong, named
    p = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "site1/key is readable by other users: chmod 600" in p.stderr
