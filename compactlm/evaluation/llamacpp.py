"""GGUF files scored the way every other model is: lm-eval's tasks and held-out perplexity through llama.cpp.

:class:`LlamaCppLM` is an lm-eval model over llama-cpp-python's ``Llama``: the GGUF file's own tokenizer, the same
context / continuation split as lm-eval's HF model (``TemplateLM``), the same rolling perplexity windows, and the
log-probabilities of every continuation token from llama.cpp's logits. Consecutive requests that share a prefix
(the choices of one question) reuse its KV cache. :func:`evaluate_gguf` returns the dict
:func:`compactlm.evaluation.evaluate_model` returns, with ``backend: "llama.cpp"``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.api.model import TemplateLM

if TYPE_CHECKING:
    from compactlm.config import EvalConfig

#: Tokens per llama.cpp decode call (logits for each are read back).
N_BATCH = 512


def load_gguf(path: str | os.PathLike, *, n_ctx: int, threads: int | None = None, seed: int = 0):
    """llama-cpp-python's ``Llama`` on `path` (quiet, `n_ctx` context, `threads` CPU threads; None = all).

    On a llama.cpp build with AMX (Sapphire Rapids and later CPUs) the model loads without llama.cpp's extra
    buffer types: there the AMX weight buffers crash the first decode (a segfault, ggml-org/llama.cpp#20824; seen
    on this project's CI machines), so the weights stay in plain CPU buffers (no repacking, slower quantized
    matmuls, correct results)."""
    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    kwargs = dict(model_path=str(path), n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH, n_threads=threads,
                  n_threads_batch=threads, seed=seed, verbose=False, logits_all=False)
    if not amx_build():
        return Llama(**kwargs)
    with _without_extra_buffers():
        return Llama(**kwargs)


@functools.cache
def amx_build() -> bool:
    """Whether the installed llama.cpp uses AMX (its system info says ``AMX_INT8 = 1``); asked once per process."""
    import llama_cpp.llama_cpp as capi

    return "AMX_INT8 = 1" in capi.llama_print_system_info().decode()


_LOAD_LOCK = threading.Lock()


@contextmanager
def _without_extra_buffers():
    """``Llama()`` takes no ``use_extra_bufts``; it starts from ``llama_model_default_params()``, so that function
    returns it off while one model loads (under a lock: other threads' loads wait)."""
    import llama_cpp.llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with _LOAD_LOCK:
        capi.llama_model_default_params = params
        try:
            yield
        finally:
            capi.llama_model_default_params = default


class GgufRunner:
    """Token-level access to a loaded ``Llama``: evaluate tokens from a position (KV cache of the prefix kept) and
    read log-probabilities or the greedy next token. Owns the context's state; do not mix with ``Llama.eval``."""

    def __init__(self, llm):
        self.llm = llm
        self.n_vocab = llm.n_vocab()
        self.n_ctx = llm.n_ctx()
        self._tokens: list[int] = []  # what the KV cache holds, position by position

    def _decode(self, tokens: list[int], start: int, want_logits: bool):
        """Decode tokens[start:] after the cached tokens[:start]; yield (position, logits row) when asked."""
        import numpy as np

        ctx, batch = self.llm._ctx, self.llm._batch
        ctx.kv_cache_seq_rm(-1, start, -1)
        self._tokens = self._tokens[:start]
        for i in range(start, len(tokens), N_BATCH):
            chunk = tokens[i:i + N_BATCH]
            batch.set_batch(batch=chunk, n_past=i, logits_all=want_logits)
            ctx.decode(batch)
            self._tokens.extend(chunk)
            if want_logits:
                rows = np.ctypeslib.as_array(ctx.get_logits(), shape=(len(chunk), self.n_vocab))
                yield from ((i + j, rows[j]) for j in range(len(chunk)))

    def _common_prefix(self, tokens: list[int]) -> int:
        n = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            n += 1
        return n

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | context), whether every continuation token is the greedy one)."""
        import numpy as np

        tokens = context + continuation
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the llama.cpp context of {self.n_ctx}")
        first = len(context)  # position of the first continuation token; its logits sit at first - 1
        start = min(self._common_prefix(tokens), first - 1)
        logprob, greedy = 0.0, True
        for pos, row in self._decode(tokens, start, want_logits=True):
            if pos + 1 < first or pos + 1 >= len(tokens):
                continue
            row = row.astype(np.float64)
            top = float(row.max())
            target = tokens[pos + 1]
            logprob += float(row[target] - top - np.log(np.exp(row - top).sum()))
            greedy = greedy and int(row.argmax()) == target
        return logprob, greedy

    def prefill(self, tokens: list[int]) -> None:
        """Evaluate `tokens` from scratch (logits of the last one only)."""
        for _ in self._decode(tokens, 0, want_logits=False):
            pass

    def next_token(self) -> int:
        """The greedy next token after what was evaluated last."""
        import numpy as np

        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).argmax())

    def step(self, token: int) -> None:
        """Append one token (a batch-1 decode step)."""
        for _ in self._decode([*self._tokens, token], len(self._tokens), want_logits=False):
            pass

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """`n` greedy tokens after `prompt` (end-of-text ignored)."""
        self.prefill(prompt)
        out = []
        for _ in range(n):
            out.append(self.next_token())
            self.step(out[-1])
        return out


class LlamaCppLM(TemplateLM):
    """lm-eval's model interface over a GGUF file (loglikelihood, rolling perplexity; no generation tasks)."""

    def __init__(self, path: str | os.PathLike, *, max_length: int | None = None, threads: int | None = None,
                 seed: int = 0):
        super().__init__()
        import llama_cpp

        probe = load_gguf(path, n_ctx=16, threads=1)
        train_ctx = int(llama_cpp.llama_model_n_ctx_train(probe.model))
        probe.close()
        self._max_length = int(max_length or train_ctx)
        self.runner = GgufRunner(load_gguf(path, n_ctx=self._max_length, threads=threads, seed=seed))
        self.llm = self.runner.llm
        bos, eos = self.llm.token_bos(), self.llm.token_eos()
        self._eot = int(eos)
        self._prefix = int(bos if bos >= 0 else eos)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # as lm-eval's HF model: the tokenizer's own special tokens unless told otherwise, special text parsed
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add_special_tokens is not False, special=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in requests:
            if len(context) + len(continuation) > self._max_length:  # keep the end, as lm-eval's HF model does
                context = context[-max(1, self._max_length - len(continuation)):]
            out.append(self.runner.score(list(context), list(continuation)))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        results = []
        for (string,) in [r.args for r in requests]:
            windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            results.append(sum(self.runner.score(list(c), list(t))[0] for c, t in windows))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("generation tasks are not scored on GGUF files: use loglikelihood / multiple "
                                  "choice tasks and perplexity (every compactlm_* task is one)")


def evaluate_gguf(path: str | os.PathLike, cfg: EvalConfig, *, seed: int = 0,
                  threads: int | None = None) -> dict[str, Any]:
    """Score a GGUF file on `cfg`'s tasks and held-out perplexity through llama.cpp; the result dict of
    :func:`compactlm.evaluation.evaluate_model` (``speed`` None: deployment speed is measured apart, see
    :mod:`compactlm.evaluation.deploy`), with ``backend: "llama.cpp"`` and ``size_bytes`` the file's size."""
    import llama_cpp

    from compactlm.evaluation.registry import check_tasks
    from compactlm.evaluation.runner import evaluate_lm

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a GGUF file")
    names = check_tasks(cfg)
    t0 = time.perf_counter()
    lm = LlamaCppLM(path, max_length=cfg.max_length, threads=threads, seed=seed)
    try:
        out = evaluate_lm(lm, cfg, seed=seed, _checked=names)
        params = int(llama_cpp.llama_model_n_params(lm.llm.model))
    finally:
        lm.llm.close()
    return {"tasks": out["tasks"], "perplexity": out["perplexity"], "speed": None, "backend": "llama.cpp",
            "params": params, "size_bytes": path.stat().st_size, "max_length": lm.max_length,
            "seconds": time.perf_counter() - t0, "lm_eval": out["lm_eval"]}
