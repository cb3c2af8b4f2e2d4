"""Credentials of a secure Flower deployment, and the checks that turn a bad one into one line.

    python deploy.py certs OUT --host superlink.example.org 10.0.0.5 --nodes 3     # a CA, the SuperLink's, 3 sites
    python deploy.py certs OUT --add-nodes 2                                       # 2 more sites, the same CA
    python deploy.py certs OUT --check --host superlink.example.org                # check them before a start

OUT/ca.crt            every machine (the SuperLink's certificate is checked against it; it is public)
OUT/ca.key            nowhere: it only signs (keep it offline, 0600); `--add-nodes` and a re-issue need it
OUT/superlink/        the SuperLink's machine: server.crt (SANs: every --host, 127.0.0.1, localhost), server.key
OUT/supernodes/NAME/  site NAME: `key` (its private key, 0600, never leaves the site) and `key.pub`, which the
                      SuperLink's operator enrols with `flwr supernode register key.pub` (and revokes with
                      `flwr supernode unregister NODE_ID`)

ECDSA on SECP384R1 throughout (what Flower's node authentication takes; the node keys in OpenSSH format, as
`flower-supernode --auth-supernode-private-key` reads them), made with the `cryptography` package Flower itself
depends on. TLS authenticates the SuperLink to the nodes; the enrolled keys authenticate the nodes to it.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CURVE = ec.SECP384R1
LOOPBACK = ("127.0.0.1", "localhost")  # always in the SuperLink's SANs: its own SuperExec connects over loopback


class CredentialError(Exception):
    """A credential file is missing, unreadable, expired or not the one the other side expects: one line, naming it."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: Path, data: bytes, mode: int) -> None:
    """Created with its final mode (never readable by others, even for a moment); an existing file is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have narrowed a public file's 0644


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FSSUAVL deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def node_names(out: Path) -> list[str]:
    d = Path(out) / "supernodes"
    return sorted(p.name for p in d.iterdir() if (p / "key.pub").is_file()) if d.is_dir() else []


def make_credentials(out, hosts=(), nodes: int = 0, names=(), days: int = 365) -> dict:
    """A new CA, the SuperLink's certificate for `hosts` (plus loopback) and `nodes` site key pairs (or one per name
    in `names`) under OUT; with OUT holding a CA already, only the new sites (their names must be new). Returns
    {"ca": path, "superlink": (crt, key) or None, "nodes": {name: (key, key.pub)}}."""
    out = Path(out)
    ca_crt, ca_key_path = out / "ca.crt", out / "ca.key"
    if ca_crt.exists():
        if hosts:
            raise CredentialError(f"{out} already holds a CA and a SuperLink certificate: give a new folder for a new "
                                  f"deployment, or only --add-nodes to enrol more sites under this CA")
        ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        made = {"ca": ca_crt, "superlink": None, "nodes": {}}
    else:
        if not hosts:
            raise CredentialError("give --host with the name(s) or address(es) the SuperNodes reach the SuperLink at "
                                  "(127.0.0.1 for a deployment on this machine)")
        ca_key = ec.generate_private_key(CURVE())
        now = _now()
        ca = (x509.CertificateBuilder().subject_name(_name("FSSUAVL deployment CA")).issuer_name(_name("FSSUAVL deployment CA"))
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                           crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
              .sign(ca_key, hashes.SHA384()))
        _write(ca_key_path, _pem_key(ca_key), 0o600)
        _write(ca_crt, ca.public_bytes(serialization.Encoding.PEM), 0o644)
        made = {"ca": ca_crt, "superlink": issue_server_certificate(out / "superlink", ca, ca_key, hosts, days),
                "nodes": {}}
    have = node_names(out)
    names, i = list(names), 0
    for _ in range(nodes):  # `nodes` more, numbered past the names taken
        while f"site{i}" in have or f"site{i}" in names:
            i += 1
        names.append(f"site{i}")
    for n in names:
        if n in have or not n or "/" in n or n.startswith("."):
            raise CredentialError(f"site name {n!r} is {'already enrolled in ' + str(out) if n in have else 'not a folder name'}: "
                                  f"give another")
        key = ec.generate_private_key(CURVE())
        d = out / "supernodes" / n
        _write(d / "key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                            serialization.NoEncryption()), 0o600)
        _write(d / "key.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + f" {n}\n".encode(), 0o644)
        made["nodes"][n] = (d / "key", d / "key.pub")
    return made


def issue_server_certificate(folder: Path, ca, ca_key, hosts, days: int = 365, not_before=None,
                             loopback: bool = True) -> tuple[Path, Path]:
    """folder/server.crt (signed by the CA, SANs: hosts, and loopback unless loopback=False) and folder/server.key
    (0600)."""
    key = ec.generate_private_key(CURVE())
    start = not_before or _now() - datetime.timedelta(minutes=5)
    sans = list(dict.fromkeys([*hosts, *(LOOPBACK if loopback else ())]))
    crt = (x509.CertificateBuilder().subject_name(_name(sans[0])).issuer_name(ca.subject).public_key(key.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(start)
           .not_valid_after(start + datetime.timedelta(days=days))
           .add_extension(x509.SubjectAlternativeName([_san(h) for h in sans]), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA384()))
    folder = Path(folder)
    _write(folder / "server.key", _pem_key(key), 0o600)
    _write(folder / "server.crt", crt.public_bytes(serialization.Encoding.PEM), 0o644)
    return folder / "server.crt", folder / "server.key"


# ------------------------------------------------------------------------------------------------------- checks

def _read(path, what: str, setting: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise CredentialError(f"{setting}: {p} does not exist ({what}; `python deploy.py certs` makes one)")
    try:
        return p.read_bytes()
    except OSError as e:
        raise CredentialError(f"{setting}: {p} cannot be read ({e.strerror}): fix its permissions") from e


def load_certificate(path, setting: str, what: str = "a PEM certificate") -> x509.Certificate:
    try:
        crt = x509.load_pem_x509_certificate(_read(path, what, setting))
    except ValueError as e:
        raise CredentialError(f"{setting}: {path} is not {what}") from e
    now = _now()
    if crt.not_valid_after_utc < now:
        raise CredentialError(f"{setting}: {path} expired on {crt.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: issue new "
                              f"credentials with `python deploy.py certs`")
    if crt.not_valid_before_utc > now:
        raise CredentialError(f"{setting}: {path} is not valid before {crt.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: "
                              f"check this machine's clock")
    return crt


def check_node_key(path, setting: str = "--auth-supernode-private-key") -> None:
    """A site's private key: present, readable by its owner only, an OpenSSH EC key on SECP384R1."""
    data = _read(path, "the site's private key", setting)
    if os.stat(path).st_mode & 0o077:
        raise CredentialError(f"{setting}: {path} is readable by other users: chmod 600 {path}")
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise CredentialError(f"{setting}: {path} is not an unencrypted OpenSSH private key ({e})") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != CURVE.name:
        raise CredentialError(f"{setting}: {path} is not an ECDSA key on {CURVE.name} (what Flower's node "
                              f"authentication takes): make one with `python deploy.py certs`")


def check_server_files(ca, crt, key, hosts=()) -> None:
    """The SuperLink's files: each present and valid now, the certificate signed by the CA, naming every host,
    and matching its private key."""
    ca_crt = load_certificate(ca, "--ssl-ca-certfile", "a PEM CA certificate")
    srv = load_certificate(crt, "--ssl-certfile")
    try:
        srv.verify_directly_issued_by(ca_crt)
    except (InvalidSignature, ValueError, TypeError) as e:
        raise CredentialError(f"--ssl-certfile: {crt} is not signed by the CA {ca}: give the pair of one "
                              f"`python deploy.py certs` folder") from e
    try:
        priv = serialization.load_pem_private_key(_read(key, "the SuperLink's private key", "--ssl-keyfile"), None)
    except ValueError as e:
        raise CredentialError(f"--ssl-keyfile: {key} is not a PEM private key") from e
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if priv.public_key().public_bytes(serialization.Encoding.DER, pub) != srv.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CredentialError(f"--ssl-keyfile: {key} is not the key of {crt}: give the pair from one folder")
    names = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    named = {str(v) for v in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))
    missing = [h for h in hosts if h not in named and h not in ("0.0.0.0", "::")]
    if missing:
        raise CredentialError(f"--ssl-certfile: {crt} does not name {', '.join(missing)} (it names "
                              f"{', '.join(sorted(named))}): issue it with --host {' '.join(missing)}")


def probe_superlink(address: str, ca=None, timeout: float = 10.0) -> None:
    """Before a SuperNode starts: does the SuperLink at HOST:PORT speak what this node will speak? ca=None: the
    node would connect in plaintext (--insecure). Flower retries a plaintext node against a TLS SuperLink forever
    and reports a wrong CA as a generic connection failure; this says which setting to fix. A SuperLink not
    listening (yet) passes: Flower's own retries take it from there."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError:
        return  # not up yet (or not reachable): Flower's own retries and messages take it from here
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    else:
        load_certificate(ca, "--root-certificates", "a PEM CA certificate")
        ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with ctx.wrap_socket(raw, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as e:
        why = e.verify_message or str(e)
        if "expired" in why:
            raise CredentialError(f"--superlink {address}: the SuperLink's certificate has expired: issue it anew "
                                  f"(`python deploy.py certs`) and restart the SuperLink") from e
        if "mismatch" in why or "doesn't match" in why:
            raise CredentialError(f"--superlink {address}: the SuperLink's certificate does not name {host}: issue "
                                  f"it with --host {host}, or connect by a name it carries") from e
        raise CredentialError(f"--root-certificates: {ca} did not sign the certificate of the SuperLink at {address} "
                              f"({why}): give the ca.crt of the SuperLink's credentials") from e
    except (ssl.SSLError, ConnectionError, socket.timeout) as e:
        if ca is not None:
            raise CredentialError(f"--superlink {address} does not speak TLS (was it started with --insecure?): "
                                  f"start the SuperLink with its certificate (docs/engines.md)") from e
        return  # plaintext, as the node wants
    finally:
        raw.close()
    if ca is None:
        raise CredentialError(f"--superlink {address} speaks TLS: give --root-certificates CA_FILE (the ca.crt of the "
                              f"SuperLink's credentials) instead of --insecure")
