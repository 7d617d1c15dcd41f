"""``"perspective"``: Google's Perspective API (needs ``PERSPECTIVE_API_KEY`` and the network); rate-limited,
retried, and cached on disk so no text is ever sent twice. Its ``TOXICITY`` attribute is the metric of
RealToxicityPrompts."""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saesteer.data.assets import cache_dir
from saesteer.evaluation.scorers.base import _Scorer
from saesteer.evaluation.scorers.registry import register_scorer

__all__ = ["PERSPECTIVE_URL", "PerspectiveScorer"]

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"


class PerspectiveScorer(_Scorer):
    """Google Perspective API ``attribute`` summary score (default ``TOXICITY``), the metric of RealToxicityPrompts.

    - API key: ``api_key`` or the ``PERSPECTIVE_API_KEY`` environment variable.
    - Rate limit: at most ``qps`` requests per second (Perspective's default quota is 1).
    - Retries: on HTTP 429 and 5xx and on connection errors, up to ``max_retries`` times, waiting
      ``backoff * 2**attempt`` seconds or the server's ``Retry-After`` if longer, at most ``max_backoff``.
    - Cache: an sqlite file (default ``<saesteer cache>/perspective.sqlite``) keyed by the sha256 of the
      text's UTF-8 bytes plus attribute and languages; each score is written as soon as it arrives, and
      a text already in the cache (or repeated within the call) is never sent again.
    - Texts that are empty or only whitespace score 0.0 and are not sent (the API rejects them).
    """

    name = "perspective"

    def __init__(
        self,
        api_key: str | None = None,
        *,
        attribute: str = "TOXICITY",
        languages: Sequence[str] = ("en",),
        qps: float = 1.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 64.0,
        timeout: float = 30.0,
        cache_path: str | Path | None = None,
        session: Any = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        key = api_key or os.environ.get("PERSPECTIVE_API_KEY", "").strip()
        if not key:
            raise ValueError(
                "PerspectiveScorer needs an API key: set the PERSPECTIVE_API_KEY environment variable or pass "
                "api_key=... (request one at https://developers.perspectiveapi.com)."
            )
        if not (isinstance(qps, (int, float)) and qps > 0 and math.isfinite(qps)):
            raise ValueError(f"qps must be a positive number of requests per second, got {qps!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}.")
        if isinstance(languages, str) or not languages:
            raise ValueError(f"languages must be a non-empty list such as ['en'], got {languages!r}.")
        self.batch_size = 64  # texts per cache transaction
        self._key = key
        self.attribute = attribute
        self.languages = list(languages)
        self.interval = 1.0 / float(qps)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self._sleep = sleep
        self._clock = clock
        self._next_time = -math.inf
        if session is None:
            try:
                import requests
            except ImportError as exc:
                raise ImportError("PerspectiveScorer needs requests: pip install requests") from exc
            session = requests.Session()
        self._session = session
        self.cache_path = Path(cache_path) if cache_path is not None else cache_dir() / "perspective.sqlite"
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.cache_path))
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS scores (text_sha256 TEXT NOT NULL, model TEXT NOT NULL, score REAL NOT NULL, "
            "PRIMARY KEY (text_sha256, model))"
        )
        self._db.commit()
        self._model_key = f"{attribute}|{','.join(self.languages)}"
        self.requests_sent = 0

    def close(self) -> None:
        """Close the cache database."""
        self._db.close()

    def _cached(self, digest: str) -> float | None:
        row = self._db.execute(
            "SELECT score FROM scores WHERE text_sha256 = ? AND model = ?", (digest, self._model_key)
        ).fetchone()
        return None if row is None else float(row[0])

    def _store(self, digest: str, value: float) -> None:
        self._db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?, ?)", (digest, self._model_key, value))
        self._db.commit()

    def _throttle(self) -> None:
        now = self._clock()
        if now < self._next_time:
            self._sleep(self._next_time - now)
            now = self._next_time
        self._next_time = now + self.interval

    def _request(self, text: str) -> float:
        body = {
            "comment": {"text": text},
            "languages": self.languages,
            "requestedAttributes": {self.attribute: {}},
            "doNotStore": True,
        }
        last = ""
        for attempt in range(self.max_retries + 1):
            self._throttle()
            self.requests_sent += 1
            wait = min(self.max_backoff, self.backoff * 2**attempt)
            try:
                resp = self._session.post(PERSPECTIVE_URL, params={"key": self._key}, json=body, timeout=self.timeout)
            except OSError as exc:  # requests' ConnectionError and Timeout derive from OSError
                last = f"{type(exc).__name__}: {exc}"
                self._sleep(wait)
                continue
            status = resp.status_code
            if status == 200:
                try:
                    value = float(resp.json()["attributeScores"][self.attribute]["summaryScore"]["value"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise RuntimeError(f"Perspective returned an unexpected response: {resp.text[:300]}") from exc
                return value
            if status == 429 or status >= 500:
                last = f"HTTP {status}"
                retry_after = resp.headers.get("Retry-After") if hasattr(resp, "headers") else None
                try:
                    wait = max(wait, float(retry_after)) if retry_after is not None else wait
                except ValueError:
                    pass
                self._sleep(min(wait, self.max_backoff))
                continue
            raise RuntimeError(
                f"Perspective API answered HTTP {status}: {getattr(resp, 'text', '')[:300]}. Check the API key, that "
                f"the Comment Analyzer API is enabled for it, and that {self.attribute} supports {self.languages}."
            )
        raise RuntimeError(
            f"Perspective API still failing after {self.max_retries} retries ({last}); lower qps or retry later."
        )

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        out = np.zeros(len(texts), dtype=np.float64)
        seen: dict[str, float] = {}
        for i, text in enumerate(texts):
            if not text.strip():
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            value = seen.get(digest)
            if value is None:
                value = self._cached(digest)
            if value is None:
                value = self._request(text)
                self._store(digest, value)
            seen[digest] = value
            out[i] = value
        return out


register_scorer("perspective", PerspectiveScorer)
