"""Rule verifier: extract a response's final answer and decide if it equals the reference.

Equivalence is math-verify's (sympy underneath). Each comparison runs in a persistent pool of
worker processes with a hard per-item deadline: a worker that overruns is killed and replaced,
and the item scores 0, so a pathological expression can never hang the training loop
(math-verify's own alarm-based timeout cannot interrupt sympy stuck in C code, and does not
work off the main thread). Plain integers and exact string matches take a fast path in-process.

Workers speak JSON lines over pipes (no pickle): request `{"i", "p", "g"}`, reply `{"i", "ok"}`.
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np

__all__ = [
    "ANSWER_FORMATS",
    "VerifierPool",
    "extract_answer",
    "extract_choice",
    "is_correct",
    "score",
]

ANSWER_FORMATS = ("math", "choice")
DEFAULT_TIMEOUT = 10.0
# Answers longer than this never go to sympy (only an exact string match can make them correct).
MAX_ANSWER_CHARS = 2000
CHOICE_LETTERS = "ABCDEFGHIJ"

# ----------------------------------------------------------------------------- extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_HASH_RE = re.compile(r"####[ \t]*([^\n]+)")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer|answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE
)
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox|textrm|mathbf)\s*\{(.*)\}$", re.DOTALL)
_LATEX_SPACES_RE = re.compile(r"\\[,;:! ]|~")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(?:,\d{3})+$")
_INT_RE = re.compile(r"^[+-]?\d+$")


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] ('{'), honouring nesting; None if unbalanced.

    A backslash escapes the next character, so `\\{` and `\\}` (set braces) do not nest.
    """
    depth, j = 0, start
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : j]
        j += 1
    return None


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` (or `\\boxed x`, `\\fbox{...}`)."""
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            inner = _braced(text, j)
            if inner is not None:
                return inner
        elif m.group(0).startswith("\\boxed") and j > m.end():
            tail = re.match(r"[^\s$]+", text[j:])
            if tail:
                return tail.group(0)
    return None


def _clean(ans: str) -> str:
    """Strip math delimiters, trailing punctuation and whole-answer text wrappers."""
    ans = ans.strip()
    inline = re.search(r"\$([^$]+)\$", ans)
    if inline and not ans.startswith("\\boxed"):
        ans = inline.group(1)
    ans = ans.strip().strip("$").strip()
    ans = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", ans).strip()
    ans = ans.rstrip(".").rstrip()
    while True:
        m = _TEXT_WRAP_RE.match(ans)
        if not m or _braced(ans, ans.index("{")) != m.group(1):
            break
        ans = m.group(1).strip()
    return ans


def extract_answer(text: str) -> str | None:
    """The final answer of a response: last `\\boxed{}`, else `#### x`, else "the answer is x"."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    hashes = _HASH_RE.findall(text)
    if hashes:
        return _clean(hashes[-1])
    said = _ANSWER_IS_RE.findall(text)
    if said:
        inner = _last_boxed(said[-1])
        return _clean(inner if inner is not None else said[-1])
    return None


_LETTER_RE = re.compile(r"^[\s(\[{]*\(?([A-J])\)?(?![A-Za-z0-9])")
_PAREN_LETTER_RE = re.compile(r"\(([A-J])\)")


def extract_choice(text: str, letters: str = CHOICE_LETTERS) -> str | None:
    """The multiple-choice letter a response commits to: boxed / "answer is" first, else the last `(X)`."""
    candidate = extract_answer(text)
    if candidate is not None:
        m = _LETTER_RE.match(candidate)
        if m and m.group(1) in letters:
            return m.group(1)
    found = [x for x in _PAREN_LETTER_RE.findall(text) if x in letters]
    return found[-1] if found else None


# ----------------------------------------------------------------------------- equivalence


def _normalise(ans: str) -> str:
    """Cheap canonical form for the fast path: no spaces, no thin spaces, no `$`."""
    ans = _LATEX_SPACES_RE.sub(" ", ans)
    return re.sub(r"\s+", "", ans).strip("$")


def _fast_verdict(pred: str, gold: str) -> bool | None:
    """True/False when the answer is decided without sympy (exact match, two integers); else None."""
    p, g = _normalise(pred), _normalise(gold)
    if p == g:
        return True
    if _THOUSANDS_RE.match(p):
        p = p.replace(",", "")
    if _THOUSANDS_RE.match(g):
        g = g.replace(",", "")
    if _INT_RE.match(p) and _INT_RE.match(g):
        return int(p) == int(g)
    return None


def _math_equal(pred: str, gold: str, soft_timeout: int) -> bool:
    """math-verify equivalence of two extracted answers (runs inside a worker process)."""
    from math_verify import parse, verify  # imported in workers only

    def as_boxed(s: str):
        return parse("\\boxed{" + _LATEX_SPACES_RE.sub(" ", s) + "}", parsing_timeout=soft_timeout)

    try:
        gold_parsed = as_boxed(gold)
        pred_parsed = as_boxed(pred)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout))
    except Exception:  # any sympy/latex failure means "not shown equal"
        return False


def _worker_main() -> None:
    """Worker loop: read JSON requests from stdin, answer on stdout; exits when stdin closes."""
    import logging

    logging.disable(logging.CRITICAL)
    soft = max(1, int(float(os.environ.get("CAPO_VERIFY_SOFT_TIMEOUT", "5"))))
    # Replies go to a private copy of stdout; anything a library prints lands on stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import math_verify  # noqa: F401  (pay the sympy import before announcing readiness)

    _math_equal("1", "1", soft)
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        ok = _math_equal(req["p"], req["g"], soft)
        out.write(json.dumps({"i": req["i"], "ok": ok}) + "\n")
        out.flush()


# ----------------------------------------------------------------------------- process pool


class _Worker:
    """One verifier subprocess and its line buffer."""

    def __init__(self, soft_timeout: float):
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
        env["CAPO_VERIFY_SOFT_TIMEOUT"] = str(soft_timeout)
        env.setdefault("JAX_PLATFORMS", "cpu")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from capo_jax.rewards.verify import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = 0.0

    def send(self, index: int, pred: str, gold: str, timeout: float) -> None:
        self.item = index
        self.deadline = time.monotonic() + timeout
        self.proc.stdin.write((json.dumps({"i": index, "p": pred, "g": gold}) + "\n").encode())
        self.proc.stdin.flush()

    def read_lines(self) -> list[dict] | None:
        """Messages now available; None when the worker has exited."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        msgs = []
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not one of our replies
            if isinstance(msg, dict):
                msgs.append(msg)
        return msgs

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class VerifierPool:
    """Persistent math-verify subprocesses; an item that overruns `timeout` gets 0 and its worker is replaced."""

    def __init__(self, num_workers: int = 2, *, startup_timeout: float = 120.0, soft_timeout: float = 5.0):
        if num_workers < 1:
            raise ValueError(f"VerifierPool needs num_workers >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout = startup_timeout
        self.soft_timeout = soft_timeout
        self._lock = threading.Lock()
        self._workers = [_Worker(soft_timeout) for _ in range(num_workers)]
        self.timeouts = 0  # items killed by the hard deadline, for the trainer's metrics
        self.restarts = 0

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers[self._workers.index(w)] = _Worker(self.soft_timeout)
        self.restarts += 1

    def map(self, pairs: Sequence[tuple[str, str]], timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
        """Equivalence of each (pred, gold) pair; False for an item past `timeout` seconds or a crash."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        results = [False] * len(pairs)
        with self._lock:
            pending = list(range(len(pairs)))[::-1]
            busy = 0
            while pending or busy:
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.item is None and pending:
                        i = pending.pop()
                        try:
                            w.send(i, *pairs[i], timeout)
                            busy += 1
                        except (BrokenPipeError, OSError):
                            pending.append(i)
                            self._replace(w)
                fds = {w.fd: w for w in self._workers if (not w.ready) or w.item is not None}
                if not fds:
                    continue
                waits = [w.deadline - now for w in fds.values() if w.item is not None]
                waits += [w.started + self.startup_timeout - now for w in fds.values() if not w.ready]
                readable, _, _ = select.select(list(fds), [], [], max(0.0, min(waits)))
                for fd in readable:
                    w = fds[fd]
                    msgs = w.read_lines()
                    if msgs is None:  # crashed: its item (if any) scores 0
                        if w.item is not None:
                            busy -= 1
                        elif not w.ready:
                            self._fail_start(w)
                        self._replace(w)
                        continue
                    for msg in msgs:
                        if msg.get("ready"):
                            w.ready = True
                        elif w.item is not None and msg.get("i") == w.item:
                            results[w.item] = bool(msg["ok"])
                            w.item = None
                            busy -= 1
                now = time.monotonic()
                for w in list(self._workers):
                    if w.item is not None and now >= w.deadline:
                        self.timeouts += 1
                        busy -= 1
                        self._replace(w)
                    elif not w.ready and now >= w.started + self.startup_timeout:
                        self._fail_start(w)
        return results

    def _fail_start(self, w: _Worker) -> None:
        rc = w.proc.poll()
        self.close()
        raise RuntimeError(
            f"verifier worker failed to start (exit code {rc}); check that `{sys.executable} -c "
            "'from capo_jax.rewards.verify import _worker_main'` runs and math-verify is installed"
        )

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        for w in self._workers:
            w.kill()
        self._workers = []

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DEFAULT_POOL: VerifierPool | None = None
_DEFAULT_LOCK = threading.Lock()


def default_pool() -> VerifierPool:
    """The process-wide pool used when none is passed (created on first use, closed at exit)."""
    global _DEFAULT_POOL
    with _DEFAULT_LOCK:
        if _DEFAULT_POOL is None or not _DEFAULT_POOL._workers:
            _DEFAULT_POOL = VerifierPool(num_workers=max(1, min(4, (os.cpu_count() or 2))))
            atexit.register(_DEFAULT_POOL.close)
        return _DEFAULT_POOL


# ----------------------------------------------------------------------------- public API


def _choice_letter(reference: str, letters: str) -> str | None:
    m = _LETTER_RE.match(_clean(reference))
    return m.group(1) if m and m.group(1) in letters else None


def score(
    responses: Sequence[str],
    references: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    answer_format: str = "math",
    pool: VerifierPool | None = None,
) -> np.ndarray:
    """Outcome r_i in {0, 1} (float32[N]) for each response against its reference answer."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references: pass one reference per response")
    out = np.zeros(len(responses), np.float32)
    if answer_format == "choice":
        for i, (resp, ref) in enumerate(zip(responses, references)):
            gold = _choice_letter(str(ref), CHOICE_LETTERS)
            out[i] = float(gold is not None and extract_choice(resp) == gold)
        return out
    slow: list[tuple[int, str, str]] = []
    for i, (resp, ref) in enumerate(zip(responses, references)):
        pred = extract_answer(resp)
        gold_box = _last_boxed(str(ref))
        gold = _clean(gold_box if gold_box is not None else str(ref))
        if pred is None or not gold:
            continue
        fast = _fast_verdict(pred, gold)
        if fast is not None:
            out[i] = float(fast)
        elif len(pred) <= MAX_ANSWER_CHARS and len(gold) <= MAX_ANSWER_CHARS:
            slow.append((i, pred, gold))
    if slow:
        verdicts = (pool or default_pool()).map([(p, g) for _, p, g in slow], timeout)
        for (i, _, _), ok in zip(slow, verdicts):
            out[i] = float(ok)
    return out


def is_correct(
    response: str, reference: str, *, timeout: float = DEFAULT_TIMEOUT, answer_format: str = "math"
) -> bool:
    """Whether the response's final answer is equivalent to the reference (see `score`)."""
    return bool(score([response], [reference], timeout=timeout, answer_format=answer_format)[0] > 0.5)
