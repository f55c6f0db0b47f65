"""Sample ranker functions for tests, importable as "helpers_rank:<name>" (pytest puts tests/ on
sys.path), and a local OpenAI-compatible judge server. The functions' behaviour is keyed on the
prompt text so that a test can aim a failure at one prompt."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def length_score(prompt: list[dict], responses: list[str]) -> list[float]:
    """Score = response length; misbehaves on purpose when the last user turn says so."""
    text = prompt[-1]["content"]
    if "NAN" in text:
        return [float("nan")] + [1.0] * (len(responses) - 1)
    if "SHORT" in text:
        return [1.0] * (len(responses) - 1)
    if "RAISE" in text:
        raise ValueError("boom")
    return [float(len(r)) for r in responses]


# P(a beats b) for the three candidates "a", "b", "c" (deliberately not symmetric).
PAIR_TABLE = {("a", "b"): 0.8, ("b", "a"): 0.4, ("a", "c"): 0.6, ("c", "a"): 0.6, ("b", "c"): 0.9, ("c", "b"): 0.3}


def table_pairwise(prompt: list[dict], a: str, b: str) -> float:
    return PAIR_TABLE[(a, b)]


def bad_pairwise(prompt: list[dict], a: str, b: str) -> float:
    return 1.5


not_a_function = 42


class JudgeServer:
    """A local OpenAI-compatible server. `reply(body, headers, n)` -> (status, text, delay_s)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple[dict, dict]] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((body, dict(self.headers)))
                status, text, delay = judge.reply(body, dict(self.headers), len(judge.requests))
                time.sleep(delay)
                payload = (json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                           if status == 200 else text).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
