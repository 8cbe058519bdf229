"""Mutual TLS and bearer tokens on a real coordinator: the right client trains, the wrong ones are refused."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcmp.common.constants import EXIT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE

BIN = Path(sys.executable).parent

TOKEN = "t0k3n-for-client-0-" + "x" * 16
OPERATOR_TOKEN = "t0k3n-for-an-operator-" + "z" * 16


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def status_port_flags(tmp_path: Path) -> list[str]:
    return ["--status-port", "0", "--status-port-file", str(tmp_path / "status.port")]


def read_status_port(tmp_path: Path, server: subprocess.Popen) -> int:
    """The status port a server started with `status_port_flags(tmp_path)` bound (it is written after the main one)."""
    port_file = tmp_path / "status.port"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        assert server.poll() is None and time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.1)
    return int(port_file.read_text())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    root = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=fedcmp test CA", cwd=root)
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=root)
        (root / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=root)
    (root / "tokens").write_text(f"client_0 {TOKEN}\noperator:alice {OPERATOR_TOKEN}\n")
    (root / "good.token").write_text(TOKEN)
    (root / "operator.token").write_text(OPERATOR_TOKEN)
    (root / "bad.token").write_text("not-the-token-" + "y" * 16)
    return root


def test_mutual_tls_with_tokens(processes, two_client_data: Path, tmp_path: Path, pki: Path) -> None:
    state = tmp_path / "state"
    server, address = processes.server(
        state, "--rounds", "1", "--min-clients", "1", "--local-steps", "2", "--tls-cert", str(pki / "server.pem"),
        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"), "--auth-tokens",
        str(pki / "tokens"), "--linger", "5", *status_port_flags(tmp_path))
    tls = ["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key")]
    # The status port speaks the same mutual TLS and wants the same operator token.
    status_address = f"127.0.0.1:{read_status_port(tmp_path, server)}"
    on_status_port = subprocess.run([str(BIN / "fedcmp-status"), "--server", status_address, "--json", *tls,
                                     "--token-file", str(pki / "operator.token")], capture_output=True, text=True,
                                    timeout=60)
    assert on_status_port.returncode == EXIT_OK, on_status_port.stderr
    assert json.loads(on_status_port.stdout)["phase"] == "WAITING"
    no_certificate = subprocess.run([str(BIN / "fedcmp-status"), "--server", status_address, "--tls-ca",
                                     str(pki / "ca.pem"), "--token-file", str(pki / "operator.token"), "--timeout", "5"],
                                    capture_output=True, text=True, timeout=60)
    assert no_certificate.returncode == EXIT_UNAVAILABLE
    data = two_client_data / "client_0"
    impostor = processes.client("impostor", address, data, *tls, "--token-file", str(pki / "bad.token"))
    assert processes.wait(impostor, timeout=120) == EXIT_REFUSED
    assert "bearer token" in impostor.log_path.read_text()
    # Right token, but registering under another site's name.
    thief = processes.client("thief", address, data, *tls, "--token-file", str(pki / "good.token"),
                             "--client-id", "client_9")
    assert processes.wait(thief, timeout=120) == EXIT_REFUSED
    assert "does not belong to client 'client_9'" in thief.log_path.read_text()
    # No client certificate: the TLS handshake itself fails, the client gives up after its budget.
    anonymous = processes.client("anonymous", address, data, "--tls-ca", str(pki / "ca.pem"), "--token-file",
                                 str(pki / "good.token"), "--reconnect-budget", "3")
    assert processes.wait(anonymous, timeout=120) == 4

    honest = processes.client("honest", address, data, *tls, "--token-file", str(pki / "good.token"))
    assert processes.wait(honest) == 0, honest.log_path.read_text()[-2000:]
    assert processes.wait(server) == 0
    assert json.loads((state / "run.json").read_text())["done"]


def test_tokens_over_plaintext_are_warned_about_and_status_needs_an_operator(processes, two_client_data: Path,
                                                                            tmp_path: Path, pki: Path) -> None:
    server, address = processes.server(tmp_path / "state", "--auth-tokens", str(pki / "tokens"),
                                       *status_port_flags(tmp_path))
    assert "bearer tokens over PLAINTEXT" in server.log_path.read_text()

    def status(at: str, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "fedcmp-status"), "--server", at, "--json", *flags],
                              capture_output=True, text=True, timeout=60)

    for at in (address, f"127.0.0.1:{read_status_port(tmp_path, server)}"):  # the main port, the status port
        anonymous, client, operator = status(at), status(at, "--token-file", str(pki / "good.token")), \
            status(at, "--token-file", str(pki / "operator.token"))
        assert anonymous.returncode == client.returncode == EXIT_UNAVAILABLE
        assert "UNAUTHENTICATED" in anonymous.stderr and "operator's bearer token" in client.stderr
        assert operator.returncode == EXIT_OK and json.loads(operator.stdout)["phase"] == "WAITING"
        assert "PLAINTEXT" in operator.stderr
    # A client sending its token without TLS warns before it even reaches a coordinator.
    plain = processes.client("plain", "127.0.0.1:1", two_client_data / "client_0", "--token-file",
                             str(pki / "good.token"), "--reconnect-budget", "1")
    assert processes.wait(plain, timeout=120) == EXIT_UNAVAILABLE
    assert "sending the bearer token over PLAINTEXT" in plain.log_path.read_text()
