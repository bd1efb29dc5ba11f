"""A small Neuronpedia client: one feature's public JSON over plain HTTP, cached on disk.

`NeuronpediaClient.feature(model_id, source, index)` answers `GET {base}/api/feature/{model_id}/
{source}/{index}` (no API key needed) with a validated `NeuronpediaFeature`, or None when
Neuronpedia has no such feature (HTTP 404). The base URL is `$NEURONPEDIA_API_URL`, default the
public site, so tests and mirrors can point it elsewhere.

Every response used (404s included) is kept under data/neuronpedia_cache/{model_id}/{source}/
{index}.json as {url, status, response: the JSON as received}, written atomically, and a cached entry
is answered without any request: a second run, or an offline machine that has the cache directory,
makes none. 429s (honouring Retry-After), 5xx,
timeouts and connection errors are retried with exponential backoff; whatever is still wrong after
the last try, and any malformed or unexpected JSON, is one `UserError` line naming the URL and
the status or field. The sleep between tries is injectable so tests never wait.

Its ~310 lines are one protocol (request, retry, cache, payload validation) kept in one place.
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from pipeline.core import artifacts
from pipeline.core.errors import UserError
from pipeline.core.io import write_text

API_URL_ENV = "NEURONPEDIA_API_URL"
DEFAULT_API_URL = "https://www.neuronpedia.org"
TRIES = 3  # attempts per URL, the first included
BACKOFF_S = 1.0  # waits 1 s, 2 s, 4 s ... between attempts, unless the server says otherwise
MAX_WAIT_S = 120.0  # a longer Retry-After means an exhausted quota: fail now rather than hang
TIMEOUT_S = (5.0, 30.0)  # connect, read
USER_AGENT = "sae-feature-interventions (research pipeline; plain HTTP, responses cached)"
OFFLINE_REMEDY = (
    f"with no network, copy {artifacts.NEURONPEDIA_CACHE}/ from a run that had one, point {API_URL_ENV} at a "
    "reachable mirror, or set feature_source to csv or auto"
)


@dataclass(frozen=True)
class Explanation:
    description: str  # whitespace collapsed; Neuronpedia's often start with a space
    model: str | None  # explanationModelName, e.g. gpt-4o-mini
    score: float | None  # mean of the payload's scores[].value; None where it has none


@dataclass(frozen=True)
class NeuronpediaFeature:
    """The fields of a feature's payload this project uses, validated."""

    model_id: str
    source: str
    index: int
    frac_nonzero: float  # firing rate on Neuronpedia's dataset
    max_act: float | None  # maxActApprox (null in the schema for features never processed)
    explanations: tuple[Explanation, ...]  # in the API's order (best first by its own scores)
    pos_tokens: tuple[tuple[str, float], ...]  # top promoted logit tokens, largest first
    neg_tokens: tuple[tuple[str, float], ...]  # top suppressed logit tokens, most negative first

    @property
    def best_explanation(self) -> Explanation | None:
        """The highest-scored explanation where any is scored, else the API's first; None if none."""
        described = [e for e in self.explanations if e.description]
        scored = [e for e in described if e.score is not None]
        if scored:
            return max(scored, key=lambda e: e.score)  # first of equals: keeps the API's order
        return described[0] if described else None


def api_base_url() -> str:
    base = os.environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL
    if not base.startswith(("http://", "https://")):
        raise UserError(f"{API_URL_ENV} is {base!r}; it needs an http:// or https:// URL such as {DEFAULT_API_URL}")
    return base.rstrip("/")


def split_neuronpedia_id(neuronpedia_id: str) -> tuple[str, str]:
    """'gpt2-small/4-res-jb' -> ('gpt2-small', '4-res-jb'): Neuronpedia's modelId and source."""
    model_id, _, source = neuronpedia_id.partition("/")
    if not model_id or not source or "/" in source:
        raise UserError(f"Neuronpedia id {neuronpedia_id!r} is not of the form MODEL/SOURCE (e.g. gpt2-small/4-res-jb)")
    return model_id, source


# ---- validation: every field we use, by name; a wrong one is an error, never a default ----------

def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(obj: dict, key: str, where: str, name: str) -> Any:
    if key not in obj:
        raise UserError(f"{where}: field '{name}' is missing from the response")
    return obj[key]


def _as_str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{name}' is {value!r} ({_kind(value)}); expected a string")
    return value


def _as_number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where}: field '{name}' is {value!r} ({_kind(value)}); expected a finite number")
    return float(value)


def _as_list(value: Any, where: str, name: str) -> list:
    if not isinstance(value, list):
        raise UserError(f"{where}: field '{name}' is {_kind(value)}; expected a list")
    return value


def _token_pairs(payload: dict, where: str, kind: str, descending: bool) -> tuple[tuple[str, float], ...]:
    names, values = f"{kind}_str", f"{kind}_values"
    strs = _as_list(_get(payload, names, where, names), where, names)
    vals = _as_list(_get(payload, values, where, values), where, values)
    if len(strs) != len(vals):
        raise UserError(f"{where}: field '{names}' has {len(strs)} entries but '{values}' has {len(vals)}")
    pairs = [(_as_str(s, where, f"{names}[{i}]"), _as_number(v, where, f"{values}[{i}]"))
             for i, (s, v) in enumerate(zip(strs, vals, strict=True))]
    # Sorted here rather than trusted: a stable sort keeps the API's order among equal values.
    return tuple(sorted(pairs, key=lambda p: -p[1] if descending else p[1]))


def _explanation(item: Any, where: str, i: int) -> Explanation:
    name = f"explanations[{i}]"
    if not isinstance(item, dict):
        raise UserError(f"{where}: field '{name}' is {_kind(item)}; expected an object")
    description = _as_str(_get(item, "description", where, f"{name}.description"), where, f"{name}.description")
    model = item.get("explanationModelName")
    if model is not None:
        model = _as_str(model, where, f"{name}.explanationModelName")
    # `scores` is absent from older payloads and empty for unscored explanations: both mean "no score".
    scores = _as_list(item.get("scores") or [], where, f"{name}.scores")
    values = []
    for j, s in enumerate(scores):
        if not isinstance(s, dict):
            raise UserError(f"{where}: field '{name}.scores[{j}]' is {_kind(s)}; expected an object")
        values.append(_as_number(_get(s, "value", where, f"{name}.scores[{j}].value"), where,
                                 f"{name}.scores[{j}].value"))
    score = sum(values) / len(values) if values else None
    return Explanation(description=" ".join(description.split()), model=model, score=score)


def parse_feature(payload: Any, model_id: str, source: str, index: int, where: str) -> NeuronpediaFeature:
    """Validate a /api/feature payload; `where` (the URL) starts every error message."""
    if not isinstance(payload, dict):
        raise UserError(f"{where}: expected a JSON object, got {_kind(payload)}")
    for key, expected in (("modelId", model_id), ("layer", source), ("index", str(index))):
        got = _as_str(_get(payload, key, where, key), where, key)  # index is a STRING in this API
        if got != expected:
            raise UserError(f"{where}: field '{key}' is {got!r} but {expected!r} was requested")
    frac = _as_number(_get(payload, "frac_nonzero", where, "frac_nonzero"), where, "frac_nonzero")
    if not 0.0 <= frac <= 1.0:
        raise UserError(f"{where}: field 'frac_nonzero' is {frac}; expected a fraction in [0, 1]")
    raw_max = _get(payload, "maxActApprox", where, "maxActApprox")
    max_act = None if raw_max is None else _as_number(raw_max, where, "maxActApprox")
    explanations = _as_list(_get(payload, "explanations", where, "explanations"), where, "explanations")
    return NeuronpediaFeature(
        model_id=model_id, source=source, index=index, frac_nonzero=frac, max_act=max_act,
        explanations=tuple(_explanation(e, where, i) for i, e in enumerate(explanations)),
        pos_tokens=_token_pairs(payload, where, "pos", descending=True),
        neg_tokens=_token_pairs(payload, where, "neg", descending=False),
    )


def _retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


_POOL_PREFIX = re.compile(r"^(<[^>]*>|HTTPS?Connection(Pool)?\([^)]*\)): ")  # urllib3's noise


def _short(exc: BaseException) -> str:
    """'ConnectionError: Failed to establish a new connection: [Errno 111] Connection refused'."""
    # requests wraps urllib3's MaxRetryError, whose `reason` holds the error worth reading.
    inner = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None
    reason = getattr(inner, "reason", None) or inner or exc
    text = _POOL_PREFIX.sub("", str(reason).splitlines()[0] if str(reason) else "")[:160]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class NeuronpediaClient:
    """Fetches feature payloads, answering from the on-disk cache whenever it can."""

    def __init__(self, base_url: str | None = None, cache_dir: str | Path = artifacts.NEURONPEDIA_CACHE, *,
                 sleep: Callable[[float], None] = time.sleep, tries: int = TRIES,
                 timeout: tuple[float, float] = TIMEOUT_S, session: requests.Session | None = None):
        self.base_url = (base_url or api_base_url()).rstrip("/")
        self.cache_dir = Path(cache_dir)
        self.tries = tries
        self.timeout = timeout
        self._sleep = sleep
        self._session = session or requests.Session()
        self._session.headers.update({"Accept": "application/json", "User-Agent": USER_AGENT})
        self.requests_made = 0  # HTTP attempts sent (tests and logs: an offline rerun sends none)
        self.cache_hits = 0

    def url(self, model_id: str, source: str, index: int) -> str:
        return f"{self.base_url}/api/feature/{model_id}/{source}/{index}"

    def cache_path(self, model_id: str, source: str, index: int) -> Path:
        return self.cache_dir / model_id / source / f"{index}.json"

    def feature(self, model_id: str, source: str, index: int) -> NeuronpediaFeature | None:
        """The validated feature, or None when Neuronpedia has no such feature (HTTP 404)."""
        path = self.cache_path(model_id, source, index)
        if path.exists():
            entry = self._read_cache(path)
            self.cache_hits += 1
            if entry["status"] == 404:
                return None
            where = f"{entry['url']} (cached in {path}; delete it to fetch again)"
            return parse_feature(entry["response"], model_id, source, index, where)
        url = self.url(model_id, source, index)
        entry = self._fetch(url)
        # Validated before caching, so the cache only ever holds payloads a rerun can use.
        found = parse_feature(entry["response"], model_id, source, index, url) if entry["status"] == 200 else None
        self._write_cache(path, entry)
        return found

    def _fetch(self, url: str) -> dict[str, Any]:
        """{'url', 'status': 200 | 404, 'response'}; retries, then raises one clear line."""
        problem, remedy = "", ""
        for attempt in range(1, self.tries + 1):
            wait = BACKOFF_S * 2 ** (attempt - 1)
            self.requests_made += 1
            try:
                r = self._session.get(url, timeout=self.timeout)
            except requests.Timeout as exc:
                problem, remedy = f"timed out ({_short(exc)})", OFFLINE_REMEDY
            except requests.ConnectionError as exc:
                problem, remedy = f"could not connect ({_short(exc)})", OFFLINE_REMEDY
            else:
                status = f"HTTP {r.status_code} {r.reason or ''}".strip()
                if r.status_code == 200:
                    return {"url": url, "status": 200, "response": self._json(r, url)}
                if r.status_code == 404:
                    return {"url": url, "status": 404, "response": self._not_found_body(r, url)}
                if r.status_code == 429:
                    problem, remedy = status, "Neuronpedia's rate limit; rerun later (fetched responses are cached)"
                    asked = _retry_after_s(r.headers.get("Retry-After"))
                    wait = wait if asked is None else asked
                    if wait > MAX_WAIT_S:
                        raise UserError(f"{url} answered {status} with Retry-After {wait:.0f} s; {remedy}")
                elif r.status_code >= 500:
                    problem, remedy = status, "Neuronpedia is failing; rerun later (fetched responses are cached)"
                else:
                    raise UserError(f"{url} answered {status}; check the model id and source "
                                    f"(and {API_URL_ENV} if set)")
            if attempt < self.tries:
                self._sleep(wait)
        raise UserError(f"{url}: {problem} on all {self.tries} tries; {remedy}")

    @staticmethod
    def _json(r: requests.Response, url: str) -> Any:
        try:
            return json.loads(r.content)
        except ValueError as exc:
            raise UserError(f"{url}: the response is not valid JSON ({_short(exc)})") from None

    @staticmethod
    def _not_found_body(r: requests.Response, url: str) -> Any:
        # Neuronpedia answers a missing feature with a JSON error. An HTML 404 means a wrong base URL or
        # path; caching that as "no such feature" would hide every feature from later runs.
        try:
            return json.loads(r.content)
        except ValueError:
            raise UserError(f"{url} answered HTTP 404 with a non-JSON page, not Neuronpedia's 'not found'; "
                            f"check {API_URL_ENV} (now {url.split('/api/')[0]})") from None

    @staticmethod
    def _read_cache(path: Path) -> dict[str, Any]:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable cache entry ({_short(exc)}); delete it to fetch again") from None
        if not (isinstance(entry, dict) and entry.get("status") in (200, 404) and "response" in entry
                and isinstance(entry.get("url"), str)):
            raise UserError(f"{path} is not a Neuronpedia cache entry (needs url, status 200/404, response); "
                            "delete it to fetch again")
        return entry

    @staticmethod
    def _write_cache(path: Path, entry: dict[str, Any]) -> None:
        try:
            # Compact: real payloads carry long activation lists; `jq` makes them readable.
            write_text(path, json.dumps(entry, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UserError(f"could not write the Neuronpedia cache entry {path} ({_short(exc)})") from None
