"""The front door of the Serve app, as an attacker meets it: HTTP and gRPC of the ingress
replicas over TLS (a self-signed certificate made here), both behind the API key
(gRPC without it: UNAUTHENTICATED), every listening socket on the given host, a 20 MB
body refused with 413 while /health keeps answering; and the drain middleware."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time

import grpc
import httpx
import pytest

from tests.helpers import free_port

APP = "raylm-front"
KEY = "s3cret"
HOST = "127.0.0.1"
PROMPT = "the quick brown fox"
LIMIT = 16 << 20  # the default max_request_body_bytes


def write_self_signed_cert(directory) -> tuple[str, str]:
    """(key file, certificate file) of a self-signed certificate for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = str(directory / "key.pem"), str(directory / "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


@pytest.fixture(scope="module")
def served(ray_session, llama_dir, tmp_path_factory):
    from ray import serve

    from raylm.cluster.app import build_app

    key_path, cert_path = write_self_signed_cert(tmp_path_factory.mktemp("tls"))
    http_port, grpc_port = free_port(), free_port()
    serve.start(http_options={"host": HOST, "port": free_port()})
    serve.run(build_app({"model": llama_dir, "max_model_len": 128, "max_num_seqs": 8,
                         "served_model_name": "tiny", "api_key": KEY, "api_server_count": 2,
                         "http_host": HOST, "http_port": http_port, "grpc_port": grpc_port,
                         "ssl_keyfile": key_path, "ssl_certfile": cert_path}),
              name=APP, route_prefix="/front")
    url = f"https://{HOST}:{http_port}"
    with open(cert_path, "rb") as f:
        roots = f.read()
    deadline = time.monotonic() + 120  # both replicas listen once serve.run returns; be sure
    while httpx.get(url + "/health", verify=ssl.create_default_context(cafile=cert_path),
                    timeout=10).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    yield {"url": url, "cert": cert_path, "roots": roots, "grpc": f"{HOST}:{grpc_port}",
           "http_port": http_port, "grpc_port": grpc_port}
    serve.delete(APP)
    serve.shutdown()  # Serve keeps the HTTP options of its first start in a process


def _http(served) -> httpx.Client:
    return httpx.Client(base_url=served["url"], verify=ssl.create_default_context(cafile=served["cert"]),
                        timeout=60)


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_http_over_tls_behind_the_key(served):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    with _http(served) as c:
        assert c.get("/health").status_code == 200  # open, as in vLLM
        assert c.get("/metrics").status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/version"), ("POST", "/tokenize"),
                             ("POST", "/detokenize"), ("POST", "/v1/completions")):
            for headers in ({}, _auth("wrong")):
                r = c.request(method, path, headers=headers, json=body)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["error"]["code"] == 401
        assert c.get("/v1/models", headers=_auth()).status_code == 200
        assert c.get("/version", headers=_auth()).status_code == 200
        r = c.post("/v1/completions", headers=_auth(), json=body)
        assert r.status_code == 200, r.text
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no answer
        httpx.get(f"http://{HOST}:{served['http_port']}/health", timeout=10)


def test_grpc_over_tls_needs_the_key(served):
    from raylm.cluster.grpc_client import GenerateClient

    kw = dict(max_tokens=6, temperature=0)
    for key in (None, "wrong"):
        with GenerateClient(served["grpc"], root_certificates=served["roots"], api_key=key,
                            timeout=60) as client:
            for call in (client.generate, lambda *a, **k: list(client.generate_stream(*a, **k))):
                with pytest.raises(grpc.RpcError) as info:
                    call(PROMPT, **kw)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "API key" in info.value.details()
    with GenerateClient(served["grpc"], root_certificates=served["roots"], api_key=KEY,
                        timeout=60) as client:
        text = client.generate(PROMPT, **kw).completions[0].text
        streamed = "".join(c.text for d in client.generate_stream(PROMPT, **kw) for c in d.completions)
    with _http(served) as c:
        http_text = c.post("/v1/completions", headers=_auth(), json=dict(
            prompt=PROMPT, **kw)).json()["choices"][0]["text"]
    assert text == streamed == http_text
    with GenerateClient(served["grpc"], api_key=KEY, timeout=10) as plain:  # no TLS: no answer
        with pytest.raises(grpc.RpcError) as info:
            plain.generate(PROMPT, **kw)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_every_listener_is_bound_to_the_host(served):
    import psutil

    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    for port in (served["grpc_port"], served["http_port"]):
        # gRPC binds an IPv6 socket to the v4-mapped address: 127.0.0.1 all the same.
        mine = [c.laddr.ip.removeprefix("::ffff:") for c in listening if c.laddr.port == port]
        # One socket per ingress replica (SO_REUSEPORT), none on another interface.
        assert len(mine) == 2 and set(mine) == {HOST}, (port, mine)


def _tls_socket(served) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=served["cert"])
    return ctx.wrap_socket(socket.create_connection((HOST, served["http_port"]), timeout=60),
                           server_hostname=HOST)


def _read_now(sock: ssl.SSLSocket) -> bytes:
    """What the server has sent so far, without waiting (TLS session tickets are not data)."""
    sock.settimeout(0)
    try:
        return sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return b""
    finally:
        sock.settimeout(60)


def _response(sock, data: bytes = b"") -> tuple[int, dict]:
    """Status and JSON body of one HTTP response (the server closes the connection)."""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        try:
            return int(head.split()[1]), json.loads(body)
        except (ValueError, IndexError):
            pass
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            chunk = b""
        if not chunk:
            raise AssertionError(f"no complete response: {data[:300]!r}")
        data += chunk


def test_big_body_is_refused_while_read_and_health_answers(served):
    # Content-Length over the limit: refused before a byte of the body is sent.
    with _tls_socket(served) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n")
        status, body = _response(sock)
    assert status == 413 and str(LIMIT) in body["error"]["message"]
    assert "max_request_body_bytes" in body["error"]["message"]

    # No Content-Length (chunked), sent slowly: /health answers meanwhile, 413 past the limit.
    health_times: list[float] = []
    sending = threading.Event()

    def poll_health():
        with _http(served) as c:
            sending.wait(60)
            while sending.is_set():
                assert c.get("/health").status_code == 200
                health_times.append(time.monotonic())
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    poller.start()
    chunk = b'{"prompt": "' + b"x" * (64 << 10)
    sent, status, body, early = 0, None, None, b""
    try:
        with _tls_socket(served) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                         b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            sending.set()
            started = time.monotonic()
            while sent < 20_000_000:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                time.sleep(0.004)
                early = _read_now(sock)
                if early:
                    break  # the answer came: stop sending
            finished_sending = time.monotonic()
            status, body = _response(sock, early)
    finally:
        sending.clear()
        poller.join(60)
    assert status == 413 and str(LIMIT) in body["error"]["message"]
    assert LIMIT < sent < 20_000_000  # refused while it was being read, not after
    assert len([t for t in health_times if started < t < finished_sending]) >= 3
    with _http(served) as c:  # and the server serves on
        assert c.post("/v1/completions", headers=_auth(),
                      json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_drain_refuses_new_requests_and_ends_streams_with_an_error_event():
    """The drain middleware over a small app: 503 for new requests while draining; an
    SSE stream still open at the timeout is aborted, and gets an error event before
    [DONE]; a request that never reached the engine (stuck, no response) gets 503."""
    from raylm.cluster.drain import Drain

    async def main():
        drain = Drain(shutdown_timeout=0.3)
        open_ids = {"slow"}
        stop = asyncio.Event()

        async def abort(rid):
            open_ids.discard(rid)
            stop.set()

        async def sse(scope, receive, send):
            if scope["path"] == "/stuck":  # as one waiting for a router that has stopped
                await asyncio.Event().wait()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b'data: {"n": 1}\n\n', "more_body": True})
            await stop.wait()
            await send({"type": "http.response.body", "body": b'data: {"finish_reason": "abort"}\n\n',
                        "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

        app = drain.wrap(sse)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            stream = asyncio.ensure_future(c.get("/v1/completions"))
            stuck = asyncio.ensure_future(c.get("/stuck"))
            while drain.active_http < 2:
                await asyncio.sleep(0.01)
            draining = asyncio.ensure_future(drain.run(lambda: list(open_ids), abort))
            await asyncio.sleep(0.05)
            refused = await c.get("/health")
            await draining
            return refused, await stream, await stuck

    refused, streamed, stuck = asyncio.run(main())
    for r in (refused, stuck):
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
    events = [line[6:] for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-3]) == {"finish_reason": "abort"}
    assert json.loads(events[-2])["error"]["code"] == 503
    assert "shutdown_timeout" in json.loads(events[-2])["error"]["message"]


def test_an_ingress_without_uvicorn_standard_warns(caplog):
    """h11 or asyncio's own loop (no httptools, no uvloop) is named in a warning; the
    C parts a user's install brings warn nothing. The names are uvicorn's own classes."""
    import logging

    import uvicorn

    from raylm.cluster.app import warn_slow_http_stack

    def protocol(http: str) -> str:
        config = uvicorn.Config(lambda scope, receive, send: None, http=http, lifespan="off")
        config.load()
        return config.http_protocol_class.__name__

    with caplog.at_level(logging.WARNING, logger="raylm"):
        assert not warn_slow_http_stack(protocol("httptools"), "uvloop")
        assert not caplog.records
        assert warn_slow_http_stack(protocol("h11"), "asyncio.unix_events")
    message = caplog.records[-1].getMessage()
    assert "httptools" in message and "h11" in message and "uvloop" in message
    assert "uvicorn[standard]" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raylm"):
        assert warn_slow_http_stack(protocol("httptools"), "asyncio.unix_events")
    assert "uvloop" in caplog.records[-1].getMessage() and "h11" not in caplog.records[-1].getMessage()
