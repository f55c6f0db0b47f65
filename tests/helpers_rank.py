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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many clients connecting at once must not be refused


class JudgeServer:
    """A local OpenAI-compatible server. `reply(body, headers, n)` -> (status, text, delay_s) or
    (status, text, delay_s, extra), n counting requests from 1; extra may hold "headers" (sent
    with the reply), "raw" (the reply body sent as is) and "logprobs" (put in the 200 choice).
    `peak` is the most requests it has had in progress at once."""

    def __init__(self, reply):
        self.reply = reply
        self.requests: list[tuple[dict, dict]] = []
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.requests.append((body, dict(self.headers)))
                    n = len(judge.requests)
                    judge.in_flight += 1
                    judge.peak = max(judge.peak, judge.in_flight)
                try:
                    status, text, delay, *rest = judge.reply(body, dict(self.headers), n)
                    time.sleep(delay)
                finally:
                    with judge.lock:
                        judge.in_flight -= 1
                extra = rest[0] if rest else {}
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                if "logprobs" in extra:
                    choice["logprobs"] = extra["logprobs"]
                payload = (extra["raw"] if "raw" in extra else json.dumps({"choices": [choice]}) if status == 200
                           else text).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in extra.get("headers", {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "JudgeServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
