"""An HTTP proxy in front of the real S3 server that injects failures: 503 SlowDown on a
share of requests, or every request refused once a trigger is hit (the store going away)."""

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3:
    def __init__(self, upstream: str):
        self.upstream = urlparse(upstream)
        self.every = 0  # inject a 503 on every n-th request (0: never)
        self.down_after_put_matching: str | None = None  # once a PUT path contains this, fail everything
        self.down = False
        self.deny = False  # answer every request 403 AccessDenied
        self.delay = 0.0  # seconds added to every request (a slow store)
        self.requests = self.injected = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _handle(self):
                time.sleep(proxy.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    proxy.requests += 1
                    fail = proxy.down or (proxy.every and proxy.requests % proxy.every == 0)
                    if proxy.down_after_put_matching and self.command == "PUT" and proxy.down_after_put_matching in self.path:
                        proxy.down = True
                    proxy.injected += bool(fail)
                if proxy.deny:
                    denied = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(denied)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(denied)
                    return
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
