"""Wall time of ChatClient.complete against a local OpenAI-compatible server that takes a fixed
time per request, one request in flight vs several (what an API judge's latency costs a rank stage).

    python benchmarks/judge_client.py [--requests 64] [--delay 0.2] [--concurrency 1,8]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from selm.engines.llm_client import ChatClient


def serve(delay: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(delay)
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": "[[7]]"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds the server takes per request")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated in-flight limits")
    args = ap.parse_args()
    server = serve(args.delay)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    items = [[{"role": "user", "content": f"question {i}"}] for i in range(args.requests)]
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            client = ChatClient(url, "bench", max_concurrency=c)
            t0 = time.perf_counter()
            client.complete(items)
            print(f"concurrency {c}: {args.requests} requests in {time.perf_counter() - t0:.2f} s "
                  f"(peak in flight {client.peak_in_flight})")
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
