"""The one client for OpenAI-compatible servers (vLLM, SGLang, transformers serve): extract_data.py and remote.py
(evaluate.py's and reason.py's --reasoner-url / --perception-url) talk to servers through it, by one set of rules.

    Client(base_url, api_key, timeout, max_retries, retry_delay, concurrency)
    client.chat(model, messages, max_tokens, **params) -> Completion      POST <base>/v1/chat/completions
    client.complete(model, prompt, max_tokens, refusable=False, **params) -> Completion
                                                                          POST <base>/v1/completions
    client.map(fn, items, where) -> per item fn(item) or the Exception it raised, run concurrently
    endpoint_url(base_url, endpoint)  the URL rule of OpenAI clients;  data_url(image)  a PNG data URL

Plain HTTP from the standard library to the URL given: no hub client, so HF_HUB_OFFLINE (which blocks every
request huggingface_hub makes) never stops a loopback or other explicit server.
The rules:
  - 408 / 429 / 5xx, timeouts and network errors are retried with exponential backoff (retry_delay * 2^k, jittered);
    still failing after max_retries: TransportError.
  - 401 / 403 / 404 (wrong URL, model name or key) and 422 (the server rejects a field of the request, e.g.
    transformers serve and top_k): FatalError, which every request would hit, so the run stops.
  - any other answer (another 4xx, a reply that is not a completion): RuntimeError, for this request alone.
  - a request sent with refusable=True that the server answers 400 or 422 raises Refused instead (remote.py asks
    for token-id prompts that way and falls back to text where a server takes only text).
  - map(): a FatalError stops the batch; a batch whose every item failed with a TransportError is a FatalError
    too (the server is down: stop, record nothing, a rerun does them), otherwise failures come back per item.
"""
import base64
import http.client
import io
import json
import os
import random
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FATAL_HTTP = (401, 403, 404, 422)


class FatalError(RuntimeError):
    """A problem every request would hit (bad URL, model name, key, a rejected field): stop the run."""


class TransportError(RuntimeError):
    """The server stayed unreachable or unavailable (refused, reset, timed out, HTTP 408/429/5xx) through every
    retry. One request's is a failed record; a whole batch of them stops the run (the server is down)."""


class Refused(RuntimeError):
    """HTTP 400 / 422 to a request sent with refusable=True: the server does not take the request in that form."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclass
class Completion:
    text: str                   # the generated text (the server decodes it, special tokens skipped)
    finish_reason: str | None   # "stop" (end of reply or a stop string) or "length" (max_tokens)
    completion_tokens: int | None  # usage.completion_tokens: servers count the end-of-reply token too
    stop_reason: object = None  # which stop matched, where the server says (vLLM stop_reason, SGLang matched_stop)
    token_ids: list | None = None  # the generated ids, where the server returns them (vLLM's return_token_ids)


def endpoint_url(base_url, endpoint="chat/completions"):
    """A server URL -> the endpoint (the rule of OpenAI clients): .../v1 -> .../v1/<endpoint>, a bare host ->
    host/v1/<endpoint>, the endpoint itself unchanged. A URL naming the other endpoint is an error."""
    head, sep, query = base_url.partition("?")
    path = head.rstrip("/")
    named = next((e for e in ("chat/completions", "completions") if path.endswith("/" + e)), None)
    if named is None:
        path += f"/{endpoint}" if path.endswith("/v1") else f"/v1/{endpoint}"
    elif named != endpoint:
        raise ValueError(f"{base_url}: names the {named} endpoint; this step needs {endpoint}: give the server's "
                         "base URL (e.g. http://host:8000/v1)")
    return path + sep + query


def chat_completions_url(base_url):
    return endpoint_url(base_url, "chat/completions")


def data_url(image):
    """PIL image -> PNG data URL: lossless, so the server decodes exactly the pixels the local path would use."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def short(e, n=300):
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n] + " ..."


def add_client_args(group):
    """The connection flags every tool that talks to a server shares (extract_data.py, evaluate.py, reason.py)."""
    # the key's default is resolved in Client.from_args, so no help text ever prints it
    group.add_argument("--api-key", help="bearer token (unset: $OPENAI_API_KEY, else EMPTY)")
    group.add_argument("--concurrency", type=int, default=16,
                       help="requests in flight, one thread each (default: %(default)s)")
    group.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    group.add_argument("--max-retries", type=int, default=5,
                       help="retries on 429/5xx/timeouts/network errors (default: %(default)s)")
    group.add_argument("--retry-delay", type=float, default=1.0,
                       help="first backoff in seconds, doubled per retry (default: %(default)s)")


class Client:
    """One server. `check` names what to fix when the server refuses every request (the tool's flags)."""

    def __init__(self, base_url, api_key="EMPTY", timeout=300.0, max_retries=5, retry_delay=1.0, concurrency=16,
                 check="the URL, the model name and --api-key"):
        self.base_url, self.api_key, self.timeout = base_url, api_key, timeout
        self.max_retries, self.retry_delay, self.check = max_retries, retry_delay, check
        self.pool = ThreadPoolExecutor(concurrency)

    @classmethod
    def from_args(cls, base_url, args, check):
        key = args.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
        return cls(base_url, key, args.timeout, args.max_retries, args.retry_delay, args.concurrency, check)

    def _post(self, url, payload):
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read())

    def request(self, endpoint, payload, refusable=False):
        """POST payload to the endpoint with the retry rules above -> Completion. refusable: HTTP 400 / 422 raise
        Refused (the caller has another form of the request to try) instead of RuntimeError / FatalError."""
        try:
            url, model = endpoint_url(self.base_url, endpoint), payload.get("model")
        except ValueError as e:   # a URL naming the other endpoint: every request would hit it
            raise FatalError(str(e)) from None
        for attempt in range(self.max_retries + 1):
            after = f" after {attempt} retries" if attempt else ""
            try:
                out = self._post(url, payload)
            except urllib.error.HTTPError as e:   # the server answered with an error status
                why = short(e.read().decode("utf-8", "replace") or e.reason)
                if refusable and e.code in (400, 422):
                    raise Refused(e.code, f"HTTP {e.code} from {self.base_url}: {why}") from None
                if e.code in FATAL_HTTP:
                    raise FatalError(f"{self.base_url} (model {model!r}) answered HTTP {e.code}: {why}; "
                                     f"check {self.check}") from None
                if not (e.code in (408, 429) or e.code >= 500):
                    raise RuntimeError(f"HTTP {e.code} from {self.base_url}: {why}") from None
                if attempt == self.max_retries:
                    raise TransportError(f"HTTP {e.code} from {self.base_url}{after}: {why}") from None
            except (OSError, http.client.HTTPException) as e:   # refused, reset, timed out, cut short
                if attempt == self.max_retries:
                    cause = e.reason if isinstance(getattr(e, "reason", None), BaseException) else e
                    why = f"{type(cause).__name__} from {self.base_url}{after}: {short(cause)}"
                    raise TransportError(why) from None
            else:
                return self._completion(out, endpoint)
            time.sleep(self.retry_delay * 2 ** attempt * random.uniform(1.0, 1.5))

    def _completion(self, out, endpoint):
        try:
            choice = out["choices"][0]
            text = choice["message"]["content"] if endpoint == "chat/completions" else choice["text"]
            usage = out.get("usage") or {}
            ids = choice.get("token_ids")
            return Completion(text or "", choice.get("finish_reason"), usage.get("completion_tokens"),
                              choice.get("stop_reason", choice.get("matched_stop")),
                              [int(i) for i in ids] if isinstance(ids, list) else None)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise RuntimeError(f"{self.base_url}: not a {endpoint.replace('/', ' ')} reply ({short(out)})") from e

    def chat(self, model, messages, max_tokens, **params):
        return self.request("chat/completions", {"model": model, "messages": messages, "max_tokens": max_tokens,
                                                 **params})

    def complete(self, model, prompt, max_tokens, refusable=False, **params):
        """prompt: the text, or token ids (vLLM and SGLang take a list of ids; transformers serve answers 400)."""
        return self.request("completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, **params},
                            refusable)

    def map(self, fn, items, where):
        """fn over items, concurrently -> per item its result or the Exception it raised (in order). A FatalError
        stops everything; a batch that failed to reach the server altogether is one (`where` names it)."""
        futures = [self.pool.submit(fn, item) for item in items]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except FatalError:
                for other in futures:
                    other.cancel()
                raise
            except Exception as e:
                results.append(e)
        if results and all(isinstance(r, TransportError) for r in results):   # nothing is recorded: a rerun does them
            raise FatalError(f"every sample of the batch at {where} failed to reach the server: {results[0]}")
        return results
