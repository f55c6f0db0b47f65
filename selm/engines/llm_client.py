"""A concurrent client for OpenAI-compatible ``/chat/completions`` endpoints (stdlib only).

    client = ChatClient("http://localhost:8000/v1", "judge-model", api_key_env="OPENAI_API_KEY",
                        max_concurrency=8, key="rank")
    replies = client.complete([messages_1, messages_2, ...], temperature=0, max_tokens=256)
    replies[0].text, replies[0].top_logprobs   # in INPUT order, whatever order the server answers in

Each item is a message list (sent as ``{"model", "messages", **params}``) or a whole request body
(a dict with "messages"; its own fields win over ``params``). ``extra_body`` adds fields to every
request, as the OpenAI SDK's argument of that name does (e.g. vLLM's ``structured_outputs``, or
``chat_template_kwargs`` for a reasoning model); it may not set a field the client sets itself. At most ``max_concurrency`` requests
are in flight at once (daemon threads). With ``logprobs=True, top_logprobs=k`` a reply also carries the
first generated token's top-k log-probabilities (a judge's soft preference).

Failures: timeouts, connection errors, malformed replies, 429 and 5xx are retried up to
``max_retries`` times with exponential backoff and jitter, or after the server's Retry-After (capped
at ``MAX_WAIT_S``); other 4xx fail at once. A 429 also halves the number of requests in flight and
holds new ones until its Retry-After has passed; the limit grows back by one per success once no 429
has come for ``recover_s`` seconds. A request that stays down raises ONE ``ChatError`` line:
``{key}.url: {endpoint}: {what happened} ({n} attempts; {which item})``.

The API key is read from the environment variable ``api_key_env`` for each request: it is never kept
on the client, and it is redacted from every error message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Sequence

from selm.config import ConfigError, EndpointConfig, check_extra_body
from selm.io import InputError

MAX_WAIT_S = 60.0
"""The longest wait between two attempts, whatever the backoff or the server's Retry-After say."""


class ChatError(InputError):
    """A request failed for good (or the reply had no message). One line, the API key redacted."""


@dataclass(frozen=True)
class Reply:
    """One chat completion: the first choice's text, and, when the request asked for ``logprobs``,
    the first generated token's top alternatives as {token: log-probability}."""

    text: str
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    """The whole JSON reply (usage, the other choices, ...)."""


class _Cancelled(ChatError):
    """Another item of the batch failed first, so this one was given up."""


class _Retry(Exception):
    """An attempt failed in a way worth retrying; `wait` is the server's Retry-After, if any."""

    def __init__(self, message: str, wait: float | None = None, rate_limited: bool = False):
        super().__init__(message)
        self.wait, self.rate_limited = wait, rate_limited


class _Limiter:
    """How many requests may be in flight, lowered on 429 (halved) and raised back by one per
    success after ``recover_s`` seconds without a 429; also a "not before" time from Retry-After."""

    def __init__(self, maximum: int, recover_s: float):
        self.maximum, self.limit, self.recover_s = maximum, maximum, recover_s
        self.in_flight = self.peak = 0
        self.resume_at = self.last_429 = 0.0
        self.cond = threading.Condition()

    def acquire(self, stop: threading.Event) -> bool:
        with self.cond:
            while not stop.is_set():
                pause = self.resume_at - time.monotonic()
                if pause <= 0 and self.in_flight < self.limit:
                    self.in_flight += 1
                    self.peak = max(self.peak, self.in_flight)
                    return True
                self.cond.wait(timeout=min(max(pause, 0.05), 0.5))
            return False

    def release(self, *, ok: bool = False, rate_limited: bool = False, wait: float = 0.0) -> None:
        with self.cond:
            self.in_flight -= 1
            now = time.monotonic()
            if rate_limited:
                self.limit = max(1, self.limit // 2)
                self.last_429 = now
                self.resume_at = max(self.resume_at, now + wait)
            elif ok and self.limit < self.maximum and now - self.last_429 >= self.recover_s:
                self.limit += 1
            self.cond.notify_all()


class ChatClient:
    """See the module docstring. ``key`` (the endpoint section: "rank.endpoint", "mtbench.judge", ...)
    starts every error line, as ``{key}.url: ...``; ``backoff_s`` is the first retry's base wait (doubled each
    retry, times a random factor in [0.5, 1.5))."""

    def __init__(self, url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0,
                 max_retries: int = 3, max_concurrency: int = 8, backoff_s: float = 1.0, key: str = "judge",
                 recover_s: float = 10.0, extra_body: dict | None = None):
        if not url or not model:
            raise ChatError(f"{key}.url: a url and a model name are required")
        try:
            check_extra_body(extra_body or {}, f"{key}.extra_body")
        except ConfigError as e:
            raise ChatError(str(e)) from None
        self.extra_body = dict(extra_body or {})
        if max_concurrency < 1 or max_retries < 0 or not timeout_s > 0:
            raise ChatError(f"{key}: max_concurrency must be >= 1, max_retries >= 0 and timeout_s > 0")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.api_key_env, self.key = model, api_key_env, key
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_concurrency = max_concurrency
        self._limiter = _Limiter(max_concurrency, recover_s)
        self._random = random.Random()

    @property
    def limit(self) -> int:
        """Requests allowed in flight now (max_concurrency, lower for a while after a 429)."""
        return self._limiter.limit

    @property
    def peak_in_flight(self) -> int:
        """The most requests this client has had in flight at once."""
        return self._limiter.peak

    def redact(self, text: str) -> str:
        secret = os.environ.get(self.api_key_env)
        return text.replace(secret, "***") if secret else text

    def body(self, item: Sequence[dict] | dict, params: dict) -> dict:
        """The request body for one item (a message list or a body dict)."""
        if isinstance(item, dict):
            if "messages" not in item:
                raise ChatError(f"{self.key}: a request body needs \"messages\"; got keys {sorted(item)}")
            return {**self.extra_body, "model": self.model, **params, **item}
        return {**self.extra_body, "model": self.model, "messages": list(item), **params}

    def complete(self, items: Sequence[Sequence[dict] | dict], *, where: Sequence[str] | None = None,
                 return_exceptions: bool = False, **params: Any) -> list[Reply | ChatError]:
        """One Reply per item, in input order. ``where`` labels the items in error lines (default
        "item i"). A failure raises its ChatError (the first in input order among those that failed;
        the remaining requests are cancelled), or with ``return_exceptions=True`` takes that item's
        place in the list and the others go on."""
        bodies = [self.body(it, params) for it in items]
        labels = list(where) if where is not None else [f"item {i}" for i in range(len(bodies))]
        if len(labels) != len(bodies):
            raise ValueError(f"where: {len(labels)} labels for {len(bodies)} items")
        if not bodies:
            return []
        stop = threading.Event()
        results: list[Reply | ChatError | None] = [None] * len(bodies)
        crashed: list[BaseException] = []
        pending = iter(range(len(bodies)))
        take = threading.Lock()

        def worker() -> None:
            while not stop.is_set():
                with take:
                    i = next(pending, None)
                if i is None:
                    return
                try:
                    results[i] = self._send(bodies[i], labels[i], stop)
                except ChatError as e:
                    results[i] = e
                    if not return_exceptions:
                        stop.set()  # the batch has failed: start nothing new, retry nothing
                except BaseException as e:  # a bug: re-raised in the caller's thread
                    crashed.append(e)
                    stop.set()

        # Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the caller returns at once instead of
        # waiting up to timeout_s for requests in flight (a pool's threads are joined at exit).
        threads = [threading.Thread(target=worker, name=f"selm-chat-{k}", daemon=True)
                   for k in range(min(self.max_concurrency, len(bodies)))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        finally:
            stop.set()  # also on Ctrl-C: waiting threads give up, sleeping ones wake
        if crashed:
            raise crashed[0]
        if not return_exceptions:
            failed = [r for r in results if isinstance(r, ChatError)]
            # A request given up because another failed first is not the news: the other one is.
            failed.sort(key=lambda r: isinstance(r, _Cancelled))
            if failed:
                raise failed[0]
        return results  # type: ignore[return-value]

    # -----------------------------------------------------------------------------------------

    def _send(self, body: dict, where: str, stop: threading.Event) -> Reply:
        data = json.dumps(body).encode("utf-8")
        last, attempt = "", 0
        for attempt in range(self.max_retries + 1):
            if not self._limiter.acquire(stop):
                raise _Cancelled(f"{self.key}.url: {self.endpoint}: cancelled ({where})")
            try:
                raw = self._attempt(data)
            except _Retry as e:
                self._limiter.release(rate_limited=e.rate_limited, wait=e.wait or 0.0)
                last = e.args[0]
                if attempt < self.max_retries:
                    base = self.backoff_s * 2 ** attempt * (0.5 + self._random.random())
                    stop.wait(min(MAX_WAIT_S, e.wait if e.wait is not None else base))
                continue
            except ChatError as e:
                self._limiter.release()
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                raise ChatError(self.redact(f"{self.key}.url: {self.endpoint}: {e} ({tries}; {where})")) from None
            self._limiter.release(ok=True)
            try:
                return parse_reply(raw)
            except ValueError:
                raise ChatError(self.redact(f"{self.key}.url: {self.endpoint}: unexpected reply "
                                            f"{json.dumps(raw)[:200]} ({where})")) from None
        tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
        raise ChatError(self.redact(f"{self.key}.url: {self.endpoint}: {last} ({tries}; {where})"))

    def _attempt(self, data: bytes) -> dict:
        """One POST. Returns the JSON reply; raises _Retry (worth another try) or ChatError (not)."""
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(self.api_key_env)  # read per request; never kept on the object
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                text = resp.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(200).decode("utf-8", "replace") if e.fp else ""
            except (OSError, http.client.HTTPException):
                detail = ""
            message = f"HTTP {e.code} {e.reason}: {detail}".strip()
            if e.code != 429 and e.code < 500:
                raise ChatError(message) from None
            raise _Retry(message, retry_after(e.headers.get("Retry-After") if e.headers else None),
                         rate_limited=e.code == 429) from None
        except (TimeoutError, socket.timeout):
            raise _Retry(f"timed out after {self.timeout_s:g} s") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retry(f"timed out after {self.timeout_s:g} s") from None
            raise _Retry(f"cannot connect: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException, UnicodeDecodeError) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        try:
            reply = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Retry(f"malformed JSON reply ({e}): {text[:80]!r}") from None
        if not isinstance(reply, dict):
            raise _Retry(f"malformed JSON reply (not an object): {text[:80]!r}")
        return reply


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (a number of seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(MAX_WAIT_S, max(0.0, seconds)) if seconds == seconds else None


def parse_reply(raw: dict) -> Reply:
    """The first choice of an OpenAI-style chat completion; ValueError if there is none."""
    try:
        choice = raw["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("no choices[0].message") from None
    if not isinstance(text, str):
        raise ValueError("message content is not text")
    return Reply(text=text, top_logprobs=first_token_logprobs(choice.get("logprobs")),
                 finish_reason=choice.get("finish_reason"), raw=raw)


def first_token_logprobs(logprobs: Any) -> dict[str, float] | None:
    """{token: logprob} of the first generated token's alternatives (the chosen token included),
    from the chat format ``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``
    (OpenAI, vLLM) or the legacy ``{"top_logprobs": [{token: logprob}]}``; None when absent."""
    if not isinstance(logprobs, dict):
        return None
    try:
        content = logprobs.get("content")
        if content:
            first = content[0]
            out = {str(t["token"]): float(t["logprob"]) for t in first.get("top_logprobs") or []}
            out.setdefault(str(first["token"]), float(first["logprob"]))
            return out
        legacy = logprobs.get("top_logprobs")
        if legacy:
            return {str(k): float(v) for k, v in legacy[0].items()}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None
    return None


def endpoint_client(ep: EndpointConfig, key: str, *, backoff_s: float = 1.0) -> ChatClient:
    """The client of an endpoint section (selm.config.EndpointConfig) at config key `key`
    ("rank.endpoint", "mtbench.judge", ...): the one place an LLM judge's client is set up from config."""
    return ChatClient(ep.url, ep.model, api_key_env=ep.api_key_env, timeout_s=ep.timeout_s,
                      max_retries=ep.max_retries, max_concurrency=ep.max_concurrency, backoff_s=backoff_s, key=key,
                      extra_body=ep.extra_body)
