"""The concurrent chat client against a real HTTP server on 127.0.0.1: input order whatever order
the answers come in, a bounded number in flight, retries (429 + Retry-After, 5xx, timeouts,
malformed JSON), fewer in flight after a 429, one redacted error line when the endpoint stays down."""

from __future__ import annotations

import email.utils
import random
import socket
import time

import pytest

from selm.engines.llm_client import ChatClient, ChatError, Reply, first_token_logprobs, retry_after

KEY_ENV = "SELM_TEST_CLIENT_KEY"



def _client(url, **kw) -> ChatClient:
    kw = {"api_key_env": KEY_ENV, "backoff_s": 0.01, "max_retries": 2, **kw}
    return ChatClient(url, "judge-1", **kw)


def _msgs(i):
    return [{"role": "user", "content": f"q{i}"}]


def _echo(delay):
    """Answers "a<i>" to "q<i>" after delay(i) seconds."""
    def reply(body, headers, n):
        i = int(body["messages"][-1]["content"][1:])
        return 200, f"a{i}", delay(i)
    return reply


def test_replies_come_back_in_input_order_when_the_server_answers_out_of_order(judge_server):
    rng = random.Random(0)
    delays = [rng.uniform(0.0, 0.15) for _ in range(40)]
    server = judge_server(_echo(lambda i: delays[i]))
    replies = _client(server.url, max_concurrency=8).complete([_msgs(i) for i in range(40)], temperature=0)
    assert [r.text for r in replies] == [f"a{i}" for i in range(40)]
    assert all(isinstance(r, Reply) and r.finish_reason == "stop" for r in replies)
    assert len(server.requests) == 40 and server.peak <= 8


@pytest.mark.parametrize("limit", [1, 3, 8])
def test_never_more_than_max_concurrency_in_flight_and_the_limit_is_reached(judge_server, limit):
    server = judge_server(_echo(lambda i: 0.2))
    client = _client(server.url, max_concurrency=limit)
    t0 = time.perf_counter()
    replies = client.complete([_msgs(i) for i in range(2 * limit)])
    elapsed = time.perf_counter() - t0
    assert [r.text for r in replies] == [f"a{i}" for i in range(2 * limit)]
    assert server.peak == limit and client.peak_in_flight == limit
    assert 0.4 <= elapsed < 0.4 + 1.0  # two waves of 0.2 s, whatever the limit


def test_64_requests_at_concurrency_8_take_a_fraction_of_the_serial_time(judge_server):
    server = judge_server(_echo(lambda i: 0.2))
    t0 = time.perf_counter()
    _client(server.url, max_concurrency=8).complete([_msgs(i) for i in range(64)])
    elapsed = time.perf_counter() - t0
    assert server.peak == 8
    assert elapsed < 64 * 0.2 / 2  # serial would take 12.8 s; 8 waves of 0.2 s is 1.6 s


def test_body_params_model_and_logprobs(judge_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-client-secret")
    top = {"content": [{"token": "A", "logprob": -0.1,
                        "top_logprobs": [{"token": "A", "logprob": -0.1}, {"token": "B", "logprob": -2.4}]}]}
    server = judge_server(lambda body, headers, n: (200, "A", 0, {"logprobs": top}))
    client = _client(server.url)
    items = [_msgs(0), {"messages": _msgs(1), "max_tokens": 1, "model": "other"}]
    r0, r1 = client.complete(items, max_tokens=5, logprobs=True, top_logprobs=2)
    assert r0.top_logprobs == {"A": -0.1, "B": -2.4} and r0.text == "A"
    bodies = {b["messages"][0]["content"]: b for b, _ in server.requests}
    assert bodies["q0"] == {"model": "judge-1", "messages": _msgs(0), "max_tokens": 5, "logprobs": True,
                            "top_logprobs": 2}
    assert bodies["q1"]["model"] == "other" and bodies["q1"]["max_tokens"] == 1  # the item's own fields win
    assert all(h["Authorization"] == "Bearer sk-client-secret" for _, h in server.requests)
    assert not any("sk-client-secret" in str(v) for v in vars(client).values())  # read per call, never kept
    with pytest.raises(ChatError, match=r"needs \"messages\""):
        client.complete([{"prompt": "x"}])


def test_first_token_logprobs_formats():
    assert first_token_logprobs(None) is None
    assert first_token_logprobs({"content": [{"token": "7", "logprob": -0.5, "top_logprobs": []}]}) == {"7": -0.5}
    assert first_token_logprobs({"top_logprobs": [{"A": -0.2, "B": -1.9}]}) == {"A": -0.2, "B": -1.9}
    assert first_token_logprobs({"content": [{"bad": 1}]}) is None


def test_a_429_with_retry_after_is_waited_out_then_succeeds(judge_server):
    server = judge_server(lambda body, headers, n: (429, "slow down", 0, {"headers": {"Retry-After": "1"}}) if n == 1
                   else (200, "ok", 0))
    client = _client(server.url, max_concurrency=8)
    t0 = time.perf_counter()
    assert client.complete([_msgs(0)])[0].text == "ok"
    assert 0.95 <= time.perf_counter() - t0 < 3.0  # Retry-After (1 s), not the 0.01 s backoff
    assert len(server.requests) == 2
    assert client.limit == 4  # halved for a while after the 429


def test_429s_lower_the_in_flight_limit_and_it_recovers(judge_server):
    """Eight 429s at once (Retry-After 0.3 s) take the limit from 8 to 1: the next 16 requests go
    one at a time. With recover_s=0 each success raises it again by one."""
    arrivals = []

    def reply(body, headers, n):
        if n <= 8:
            return 429, "rate limited", 0.05, {"headers": {"Retry-After": "0.3"}}
        arrivals.append(server.in_flight)
        return 200, "ok", 0.02

    server = judge_server(reply)
    client = _client(server.url, max_concurrency=8, recover_s=60.0)
    replies = client.complete([_msgs(i) for i in range(24)])
    assert [r.text for r in replies] == ["ok"] * 24
    assert client.limit == 1 and max(arrivals) == 1
    client._limiter.recover_s = 0.0
    client.complete([_msgs(i) for i in range(5)])
    assert client.limit == 6


def test_retry_after_parsing():
    assert retry_after("2") == 2.0 and retry_after(" 0.5 ") == 0.5 and retry_after("-3") == 0.0
    assert retry_after("100000") == 60.0  # capped
    assert retry_after(None) is None and retry_after("soon") is None
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after(when) <= 31


def test_5xx_are_retried_then_succeed(judge_server):
    server = judge_server(lambda body, headers, n: (500, "overloaded", 0) if n <= 2 else (200, "fine", 0))
    assert _client(server.url, max_retries=3).complete([_msgs(0)])[0].text == "fine"
    assert len(server.requests) == 3


def test_stays_down_gives_one_redacted_line_naming_url_attempts_and_item(judge_server, monkeypatch):
    secret = "sk-never-print-me"
    monkeypatch.setenv(KEY_ENV, secret)
    server = judge_server(lambda body, headers, n: (503, f"down for {headers['Authorization']}", 0))
    with pytest.raises(ChatError) as e:
        _client(server.url, max_retries=2, key="mtbench.judge").complete([_msgs(0)], where=["question 81, turn 2"])
    msg = str(e.value)
    assert msg.startswith(f"mtbench.judge.url: {server.url}/chat/completions: HTTP 503 ")
    assert msg.endswith("(3 attempts; question 81, turn 2)")
    assert secret not in msg and "Bearer ***" in msg and "\n" not in msg
    assert len(server.requests) == 3


def test_other_4xx_fail_at_once(judge_server):
    server = judge_server(lambda body, headers, n: (400, "bad request", 0))
    with pytest.raises(ChatError, match=r"HTTP 400 .*bad request \(1 attempt; item 0\)$"):
        _client(server.url, max_retries=3).complete([_msgs(0)])
    assert len(server.requests) == 1


def test_one_failing_item_is_named_and_the_others_survive_with_return_exceptions(judge_server):
    server = judge_server(lambda body, headers, n: (404, "no such model", 0) if body["messages"][0]["content"] == "q3"
                   else (200, "ok", 0.05))
    client = _client(server.url, max_concurrency=4)
    labels = [f"prompt {i}" for i in range(6)]
    out = client.complete([_msgs(i) for i in range(6)], where=labels, return_exceptions=True)
    assert [type(r).__name__ for r in out] == ["Reply"] * 3 + ["ChatError"] + ["Reply"] * 2
    assert str(out[3]).endswith("HTTP 404 Not Found: no such model (1 attempt; prompt 3)")
    with pytest.raises(ChatError, match=r"\(1 attempt; prompt 3\)$"):  # the failure, not a cancelled item
        client.complete([_msgs(i) for i in range(6)], where=labels)


def test_timeouts_are_retried_then_reported(judge_server):
    server = judge_server(lambda body, headers, n: (200, "late", 0.6))
    t0 = time.perf_counter()
    with pytest.raises(ChatError, match=r"timed out after 0.2 s \(2 attempts; item 0\)$"):
        _client(server.url, timeout_s=0.2, max_retries=1).complete([_msgs(0)])
    assert time.perf_counter() - t0 < 2.0


def test_malformed_json_is_retried_and_reported(judge_server):
    server = judge_server(lambda body, headers, n: (200, "", 0, {"raw": "{not json"}) if n == 1 else (200, "ok", 0))
    assert _client(server.url).complete([_msgs(0)])[0].text == "ok"
    server = judge_server(lambda body, headers, n: (200, "", 0, {"raw": "<html>gateway</html>"}))
    with pytest.raises(ChatError, match=r"malformed JSON reply .*'<html>gateway</html>' \(3 attempts; item 0\)$"):
        _client(server.url).complete([_msgs(0)])
    server = judge_server(lambda body, headers, n: (200, "", 0, {"raw": '{"error": "no choices"}'}))
    with pytest.raises(ChatError, match=r"unexpected reply \{\"error\": \"no choices\"\} \(item 0\)$"):
        _client(server.url).complete([_msgs(0)])
    assert len(server.requests) == 1  # a well-formed reply without a message is not retried


def test_connection_refused_is_one_line():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChatError, match=rf"^judge\.url: http://127.0.0.1:{port}/v1/chat/completions: cannot connect: "
                                        r".*\(2 attempts; item 0\)$"):
        _client(f"http://127.0.0.1:{port}/v1", max_retries=1).complete([_msgs(0)])


def test_extra_body_goes_into_every_request_and_cannot_change_what_selm_sets(judge_server):
    server = judge_server(lambda body, headers, n: (200, "ok", 0))
    extra = {"structured_outputs": {"regex": "[[0-9]]"}, "chat_template_kwargs": {"enable_thinking": False}}
    client = ChatClient(server.url, "judge-1", key="rank", extra_body=extra)
    client.complete([_msgs(0), {"messages": _msgs(1)}], temperature=0, max_tokens=3)
    assert len(server.requests) == 2
    for body, _ in server.requests:
        assert {k: body[k] for k in extra} == extra
        assert body["model"] == "judge-1" and body["temperature"] == 0 and body["max_tokens"] == 3
    for field in ("model", "messages", "max_tokens"):
        with pytest.raises(ChatError, match=rf"^rank.extra_body: {field} is set by selm itself"):
            ChatClient(server.url, "judge-1", key="rank", extra_body={field: 1})


def test_bad_arguments():
    with pytest.raises(ChatError, match="url and a model"):
        ChatClient("", "m")
    with pytest.raises(ChatError, match="max_concurrency must be >= 1"):
        ChatClient("http://x", "m", max_concurrency=0)
    assert ChatClient("http://x/v1/chat/completions/", "m").endpoint == "http://x/v1/chat/completions"
    assert ChatClient("http://x", "m").complete([]) == []


def test_ctrl_c_returns_at_once_without_waiting_for_requests_in_flight(judge_server):
    import _thread
    import signal
    import threading

    # Ctrl-C as Python delivers it by default, whatever handler an earlier test may have left.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    server = judge_server(lambda body, headers, n: (200, "late", 30.0))
    sent = []

    def interrupt_once_all_are_in_flight():
        deadline = time.monotonic() + 20
        while server.in_flight < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        sent.append(time.perf_counter())
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_all_are_in_flight, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _client(server.url, timeout_s=60).complete([_msgs(i) for i in range(4)])
        returned = time.perf_counter()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert server.peak == 4
    assert returned - sent[0] < 2.0  # not the 30 s the server takes, nor the 60 s timeout
