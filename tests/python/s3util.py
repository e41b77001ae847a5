"""The object-store tests' S3 server and fault proxy.

`S3Server` runs tests/s3/s3rver-strict.js (s3rver from npm, file-backed, with SigV4 verification of
presigned requests and If-Match added) on a free loopback port, in a folder of the test's; it is
stopped, and its folder removed, on every path. Objects are put with plain unsigned PUTs (s3rver
takes them; what the tests check is what reshardfs reads, with signatures).

`FaultProxy` stands between reshardfs and the server: each request is forwarded as it is, unless
a fault is armed: an answer of 503 (SlowDown) before forwarding, a connection reset, a stall past
the client's timeout, a body cut short, or a delay on every request (latency). It counts what it
forwarded.

Credentials: access key S3RVER, secret S3RVER. `env()` gives what reshardfs needs to reach the
server (or the proxy).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
S3DIR = HERE.parent / "s3"
KEY = SECRET = "S3RVER"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, workdir, buckets=("ckpts",), tls=None):
        """`tls`: (key file, certificate file, the issuer's certificate), PEM, to serve https."""
        self.dir = Path(workdir) / "s3data"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.buckets = list(buckets)
        self.proc = None
        self.log = Path(workdir) / "s3rver.log"
        self.tls = tls

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self, timeout=30):
        script = S3DIR / "s3rver-strict.js"
        if not (S3DIR / "node_modules" / "s3rver").is_dir():
            raise RuntimeError(f"s3rver is not installed: run `npm ci --prefix {S3DIR}` (scripts/test.sh does)")
        self.logf = open(self.log, "ab")
        env = dict(os.environ)
        if self.tls:
            env.update(S3RVER_TLS_KEY=str(self.tls[0]), S3RVER_TLS_CERT=str(self.tls[1]))
        self.proc = subprocess.Popen(["node", "--openssl-legacy-provider", str(script), str(self.dir), str(self.port),
                                      *self.buckets], stdout=subprocess.PIPE, stderr=self.logf, env=env)
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and b"listening" not in line:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
        if b"listening" not in line:
            self.stop()
            raise RuntimeError(f"s3rver did not start: {self.log.read_text(errors='replace')[-2000:]}")
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def env(self, endpoint=None) -> dict:
        return {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint or self.endpoint}

    # --- objects (unsigned, straight to the server) ---

    def _conn(self):
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.tls[2]))
            return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=60, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def put(self, bucket, key, data: bytes):
        c = self._conn()
        c.request("PUT", f"/{bucket}/{urllib.parse.quote(key)}", body=data,
                  headers={"Content-Length": str(len(data))})
        r = c.getresponse()
        r.read()
        assert r.status == 200, f"PUT {bucket}/{key}: {r.status}"

    def delete(self, bucket, key):
        c = self._conn()
        c.request("DELETE", f"/{bucket}/{urllib.parse.quote(key)}")
        r = c.getresponse()
        r.read()
        assert r.status in (200, 204), f"DELETE {bucket}/{key}: {r.status}"

    def upload_tree(self, src, bucket, prefix):
        """Every file under `src` as `prefix/relative/path` (links followed)."""
        src = Path(src)
        n = 0
        for dirpath, _, files in os.walk(src, followlinks=True):
            for f in sorted(files):
                p = Path(dirpath) / f
                rel = p.relative_to(src).as_posix()
                self.put(bucket, f"{prefix}/{rel}" if prefix else rel, p.read_bytes())
                n += 1
        return n

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class FaultProxy:
    """A TCP proxy in front of the server, one thread per connection; faults are per request."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.port = free_port()
        self.delay = 0.0  # seconds added before forwarding every request
        self.faults: list[str] = []  # consumed one per request: "503", "reset", "stall", "truncate"
        self.stall_s = 30.0
        self.requests = 0
        self.truncated: list[str] = []  # the Range header of each request whose body was cut
        self.bytes_out = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        self.stopping = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, *faults):
        with self.lock:
            self.faults.extend(faults)

    def _next_fault(self):
        with self.lock:
            self.requests += 1
            return self.faults.pop(0) if self.faults else None

    def _accept(self):
        while not self.stopping:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            # Without TCP_NODELAY every response's head and body, two writes, waited for the
            # client's delayed ACK (Nagle): 40 ms a GET. A tp=2 view of a 1275 MiB save read
            # through the proxy with no delay in 2.84-2.94 s, 1.80-2.35 s straight from the
            # server; with it, 2.51-2.71 s (3 interleaved runs each).
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @classmethod
    def _read_request(cls, c) -> bytes | None:
        got = cls._read_head(c)
        if got is None:
            return None
        _, head, rest, n, _ = got
        n = n or 0
        while len(rest) < n:
            d = c.recv(65536)
            if not d:
                return None
            rest += d
        return head + b"\r\n\r\n" + rest

    def _serve(self, c):
        up = None
        try:
            while True:
                req = self._read_request(c)
                if req is None:
                    return
                fault = self._next_fault()
                if self.delay:
                    time.sleep(self.delay)
                if fault == "503":
                    body = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    c.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    continue
                if fault == "reset":
                    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                if fault == "stall":
                    time.sleep(self.stall_s)
                    return
                if up is None:
                    up = socket.create_connection(("127.0.0.1", self.upstream), timeout=60)
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                up.sendall(req)
                if fault == "truncate":
                    rng = [ln for ln in req.split(b"\r\n") if ln.lower().startswith(b"range:")]
                    with self.lock:
                        self.truncated.append(rng[0].split(b":", 1)[1].strip().decode() if rng else "")
                if not self._relay(up, c, head_only=req.startswith(b"HEAD"), truncate=fault == "truncate"):
                    return
        except OSError:
            return
        finally:
            c.close()
            if up is not None:
                up.close()

    def _relay(self, up, c, head_only=False, truncate=False) -> bool:
        """Forwards one response from `up` to `c` as it arrives (a body of known length is
        streamed, not held: the proxy must not be what limits throughput); `truncate` sends the
        head and half the body, then gives up. False when the connection is done."""
        got = self._read_head(up)
        if got is None:
            return False
        buf, head, rest, n, chunked = got
        if chunked or n is None or head_only or head.split(b" ")[1] in (b"204", b"304"):
            # Small answers (listings, errors): held whole, as before.
            resp = self._read_response(up, head_only, first=buf)
            if resp is None:
                return False
            if truncate:
                cut = len(resp) - max(1, (len(resp) - resp.index(b"\r\n\r\n")) // 2)
                c.sendall(resp[:cut])
                return False
            with self.lock:
                self.bytes_out += len(resp)
            c.sendall(resp)
            return True
        limit = max(1, n // 2) if truncate else n
        c.sendall(head + b"\r\n\r\n")
        sent = 0
        if rest:
            part = rest[:limit]
            c.sendall(part)
            sent += len(part)
        while sent < limit:
            d = up.recv(min(1 << 20, n - sent))
            if not d:
                return False
            d = d[: limit - sent]
            c.sendall(d)
            sent += len(d)
        with self.lock:
            self.bytes_out += len(head) + 4 + sent
        return not truncate

    @staticmethod
    def _read_head(up, first=b""):
        """Reads until the end of a request's or response's head: (all read, head, body bytes read so far,
        Content-Length or None, chunked?); None if the connection closed first."""
        buf = first
        while b"\r\n\r\n" not in buf:
            d = up.recv(65536)
            if not d:
                return None
            buf += d
        head, _, rest = buf.partition(b"\r\n\r\n")
        n, chunked = None, False
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            k = k.strip().lower()
            if k == b"content-length":
                n = int(v.strip())
            if k == b"transfer-encoding" and b"chunked" in v.lower():
                chunked = True
        return buf, head, rest, n, chunked

    @classmethod
    def _read_response(cls, up, head_only=False, first=b"") -> bytes | None:
        got = cls._read_head(up, first)
        if got is None:
            return None
        _, head, rest, n, chunked = got
        if head_only or head.split(b" ")[1] in (b"204", b"304"):
            return head + b"\r\n\r\n"
        rest = bytearray(rest)
        if chunked:
            while not rest.endswith(b"0\r\n\r\n"):
                d = up.recv(65536)
                if not d:
                    return None
                rest += d
        else:
            while n is not None and len(rest) < n:
                d = up.recv(1 << 20)
                if not d:
                    return None
                rest += d
        return head + b"\r\n\r\n" + bytes(rest)

    def close(self):
        self.stopping = True
        self.sock.close()
