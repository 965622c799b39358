"""A local Google Cloud Storage emulator for tests that run with a `gs://` workdir.

`gcs_emulator()` starts `gcp-storage-emulator` (PyPI, in-memory) on a free loopback port, creates a bucket and
points every GCS client the project uses at it, for this process and the subprocesses it starts. The emulator is
patched to behave as GCS where the clients depend on it (`_as_gcs`: generation preconditions and headers, a bucket
that refuses access).

- TensorStore (orbax's array storage): `TENSORSTORE_GCS_HTTP_URL` is the emulator's URL and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` a fake bearer token, so no credentials or metadata server are looked up.
- google-cloud-storage (orbax asks it whether a checkpoint's bucket has a hierarchical namespace):
  `STORAGE_EMULATOR_HOST`, with which it also sends no credentials.
- etils.epath: uses tf.io.gfile for `gs://` whenever TensorFlow is installed, as in production, so it reaches the
  emulator through TensorFlow (below).
- tf.io.gfile (and tf.summary, tf.data): TensorFlow's GCS filesystem has its endpoints compiled in
  (https://www.googleapis.com, https://storage.googleapis.com) and no setting to change them. Its libcurl honours
  `https_proxy` and `CURL_CA_BUNDLE`, so a small proxy (`_TlsProxy`, run as a subprocess of this file) answers
  CONNECT for those hosts with a certificate from a throwaway CA and forwards the decrypted HTTP to the emulator.

Every setting above is read when a client makes its first request or opens a store (TensorFlow reads
`https_proxy` and `CURL_CA_BUNDLE` per request, its GCS filesystem is created on first use), so they can be set
after JAX, TensorFlow, orbax and TensorStore are imported. Each emulator's bucket has a name of its own, so the
file stats TensorFlow caches per process never mix two emulators' objects: each test module may start one.

Known limits: the emulator serves one request at a time, and TensorFlow's `makedirs` on a bucket that does not
exist retries for minutes instead of failing.
"""

import contextlib
import dataclasses
import datetime
import os
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from http import HTTPStatus

import pytest

# Hosts TensorFlow's GCS filesystem sends requests to (JSON API, uploads, and media downloads).
_GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# A bucket every request to which is refused with 403, as GCS refuses a bucket the credentials may not use.
FORBIDDEN_BUCKET = "ldm-jax-forbidden"


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its URL, the bucket it was started with, and the environment it set."""

    url: str
    bucket: str
    env: dict

    def uri(self, *parts: str) -> str:
        """Returns `gs://BUCKET/part/...` for a path in the emulator's bucket."""
        return "/".join([f"gs://{self.bucket}", *parts])

    def create_bucket(self, name: str) -> None:
        """Creates another bucket in the emulator."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_listening(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with status {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{process.args} did not listen on port {port} within {timeout:.0f} s") from None
            time.sleep(0.05)


def _write_certificates(directory: str) -> tuple[str, str, str]:
    """Writes a throwaway CA and a certificate for the GCS hosts signed by it; returns (ca, cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=7)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ldm_jax test GCS emulator CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _GCS_HOSTS[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in _GCS_HOSTS]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, name) for name in ("ca.pem", "cert.pem", "key.pem"))
    pem = serialization.Encoding.PEM
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(pem))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class _TlsProxy:
    """An HTTP CONNECT proxy that terminates TLS for the GCS hosts and relays the plain HTTP to the emulator."""

    def __init__(self, port: int, upstream_port: int, cert: str, key: str):
        self.upstream_port = upstream_port
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.server = socket.create_server(("127.0.0.1", port))

    def serve_forever(self) -> None:
        """Accepts connections until the process is stopped, one thread each."""
        while True:
            client, _ = self.server.accept()
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target = head.split(b" ", 2)[:2]
            host = target.decode().rsplit(":", 1)[0]
            if method != b"CONNECT" or host not in _GCS_HOSTS:
                # Anything else would leave the machine; refuse it so a test cannot reach the real service.
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                tls = stack.enter_context(self.context.wrap_socket(client, server_side=True))
                upstream = stack.enter_context(socket.create_connection(("127.0.0.1", self.upstream_port)))
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(1 << 16)
                    if not chunk:
                        return
                    request += chunk
                request, expects_continue = _rewrite_head(request)
                if expects_continue:
                    tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                upstream.sendall(request)
            except OSError:
                return
            self._relay(tls, upstream)

    @staticmethod
    def _relay(tls: ssl.SSLSocket, upstream: socket.socket) -> None:
        peers = {tls: upstream, upstream: tls}
        while True:
            # An SSL socket may hold decrypted bytes that select() cannot see; read those first.
            ready = [tls] if tls.pending() else select.select(list(peers), [], [], 300)[0]
            if not ready:
                return
            for sock in ready:
                try:
                    data = sock.recv(1 << 16)
                except (OSError, ssl.SSLError):
                    return
                if not data:
                    return
                if sock is upstream:
                    # The emulator answers over plain HTTP, so the resumable-upload URL it hands out says http://.
                    data = data.replace(b"\r\nLocation: http://", b"\r\nLocation: https://")
                peers[sock].sendall(data)


def _rewrite_head(request: bytes) -> tuple[bytes, bool]:
    """The request as the emulator can take it, and whether the client waits for `100 Continue` before its body.

    Removes Content-Length from a chunked request's head (TensorFlow's uploads send both): the emulator reads
    Content-Length bytes when it is present, so it would store the chunk framing; HTTP says Transfer-Encoding wins.
    Removes `Expect: 100-continue`: the emulator (HTTP/1.0) never answers it, so libcurl would wait a second
    before each upload's body; the proxy answers it instead.
    """
    head, body = request.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    fields = [line.lower().replace(b" ", b"") for line in lines[1:]]
    chunked = b"transfer-encoding:chunked" in fields
    expects_continue = b"expect:100-continue" in fields
    lines = [lines[0]] + [line for line, field in zip(lines[1:], fields)
                          if not (chunked and field.startswith(b"content-length:"))
                          and field != b"expect:100-continue"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, expects_continue


def _start(args: list, ports: tuple, stack: contextlib.ExitStack) -> None:
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def stop():
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    stack.callback(stop)
    for port in ports:
        _wait_until_listening(port, process)


@contextlib.contextmanager
def gcs_emulator():
    """Starts the emulator and the TLS proxy with a bucket named ``ldm-jax-test-<random>``, sets the clients'
    environment; yields a GcsEmulator. The environment is restored and the servers stopped on exit."""
    bucket = f"ldm-jax-test-{uuid.uuid4().hex[:12]}"
    with contextlib.ExitStack() as stack:
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="gcs_emulator_"))
        port, proxy_port = _free_port(), _free_port()
        url = f"http://127.0.0.1:{port}"
        ca, cert, key = _write_certificates(directory)
        _start([sys.executable, os.path.abspath(__file__), str(port), str(proxy_port), bucket, cert, key],
               (port, proxy_port), stack)
        env = {
            "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorFlow and TensorStore send it as the bearer token
            "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage, which orbax asks for a bucket's layout
            "EPATH_USE_TF": "true",
            "https_proxy": f"http://127.0.0.1:{proxy_port}",
            "CURL_CA_BUNDLE": ca,
            "no_proxy": "127.0.0.1,localhost",  # TensorStore and google-cloud-storage talk to the emulator directly
            "NO_GCE_CHECK": "true",  # no probe of the GCE metadata server for credentials
        }
        # Upper-case variants would override the lower-case ones in some clients (requests, aiohttp, grpc).
        for name in ("HTTPS_PROXY", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                     "GOOGLE_APPLICATION_CREDENTIALS"):
            env[name] = None
        saved = {name: os.environ.get(name) for name in env}
        stack.callback(_set_env, saved)
        _set_env(env)
        yield GcsEmulator(url=url, bucket=bucket, env={k: v for k, v in env.items() if v is not None})


def _set_env(values: dict) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def emulator_fixture():
    """Returns a module-scoped pytest fixture that runs `gcs_emulator()` for the module's tests."""

    @pytest.fixture(scope="module")
    def fixture():
        with gcs_emulator() as emulator:
            yield emulator

    return fixture


def _object_generation(storage, bucket: str, name: str) -> int | None:
    """The generation of an object in the emulator's storage, or None if it does not exist."""
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return None


def _failed_precondition(request, storage) -> HTTPStatus | None:
    """GCS's answer to a request whose ifGenerationMatch / ifGenerationNotMatch does not hold, else None.

    TensorStore's OCDBT (orbax's checkpoint format) commits its manifest with these conditions; the emulator
    ignores them, so concurrent writers would overwrite each other unnoticed.
    """
    params, query = request.params or {}, request.query
    bucket, name = params.get("bucket_name"), params.get("object_id") or (query.get("name") or [None])[0]
    if bucket is None or name is None:
        return None
    current = _object_generation(storage, bucket, name)
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"][0]) != (current or 0):
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"][0]) == (current or 0):
        return HTTPStatus.NOT_MODIFIED if request.method == "GET" else HTTPStatus.PRECONDITION_FAILED
    return None


def _as_gcs(handler):
    """Wraps an emulator handler with what GCS does and the emulator does not: the forbidden bucket's 403,
    generation preconditions, and the object's generation in the `x-goog-generation` header of every read (which
    TensorStore takes as the generation of what it read)."""

    def handle(request, response, storage, *args, **kwargs):
        if (request.params or {}).get("bucket_name") == FORBIDDEN_BUCKET:
            response.status = HTTPStatus.FORBIDDEN
            response.json({"error": {"code": 403, "message": f"emulator@ldm-jax.test does not have storage "
                                                             f"access to the Google Cloud Storage bucket "
                                                             f"{FORBIDDEN_BUCKET}. Permission denied."}})
            return None
        failed = _failed_precondition(request, storage)
        if failed is not None:
            response.status = failed
            return None
        result = handler(request, response, storage, *args, **kwargs)
        params = request.params or {}
        if request.method == "GET" and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) \
                and "object_id" in params:
            generation = _object_generation(storage, params["bucket_name"], params["object_id"])
            if generation is not None:
                response["x-goog-generation"] = str(generation)
                response["x-goog-metageneration"] = "1"
        return result

    return handle


def _serve(port: int, proxy_port: int, bucket: str, cert: str, key: str) -> None:
    """Runs the emulator (in memory, with `bucket`) and the TLS proxy in front of it until the process is stopped."""
    import http.server
    import logging

    from gcp_storage_emulator import server

    read_data = server._read_data

    def read_media(handler, query):
        data = read_data(handler, query)
        # The emulator reads an empty body as no body and then fails on len(None); TensorFlow creates each
        # directory as an empty object with a media upload.
        return b"" if data is None and query.get("uploadType") == ["media"] else data

    server._read_data = read_media
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = _as_gcs(handler)
    # The emulator serves one request at a time, and TensorStore opens dozens of connections at once: with
    # http.server's backlog of 5 the rest are refused and reset instead of waiting their turn.
    http.server.HTTPServer.request_queue_size = 4096
    logging.getLogger().setLevel(logging.CRITICAL)
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).start()
    _TlsProxy(proxy_port, port, cert, key).serve_forever()


if __name__ == "__main__":
    # Emulator and proxy run in their own process, so the clients under test never compete with them for the GIL.
    _serve(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
