"""`pdserve bench --api openai`: one benchmark request over the OpenAI-compatible HTTP front (a streamed
/v1/completions with the prompt's token ids), measured as the gRPC runner measures it (pdserve/bench/runner.py).

NOTE: an SSE chunk does not say how many tokens it carries; the final usage does. Each chunk's arrival is a
token time for TTFT, and TPOT is (last chunk - first chunk) / (output tokens - 1), as for gRPC messages that carry
several tokens. The status of a refused request is the router's gRPC code name, from the error's `code` field, so
both fronts report the same statuses (RESOURCE_EXHAUSTED for a 429, ...).
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from pdserve import client_channel
from pdserve.bench.runner import Result
from pdserve.bench.workload import BenchRequest


def session(api_key: str | None, tls_ca: str | None, limit: int = 100) -> aiohttp.ClientSession:
    """An HTTP session that sends `api_key` and verifies an https:// router against `tls_ca` (limit 0: no cap
    on open connections)."""
    connector = aiohttp.TCPConnector(limit=limit, ssl=client_channel.ssl_context(tls_ca) or True)
    return aiohttp.ClientSession(connector=connector, headers=client_channel.http_headers(api_key))


async def model_info(base_url: str, api_key: str | None = None, tls_ca: str | None = None) -> tuple[str, int, int]:
    """(model id, vocab size, max model len) from GET /v1/models."""
    async with session(api_key, tls_ca) as http, http.get(base_url + "/v1/models") as r:
        if r.status != 200:
            err = (await r.json(content_type=None) or {}).get("error", {})
            raise ValueError(f"GET {base_url}/v1/models: HTTP {r.status}: {err.get('message', r.reason)}")
        m = (await r.json())["data"][0]
    return m["id"], int(m["vocab_size"]), int(m["max_model_len"])


async def one(session: aiohttp.ClientSession, base_url: str, model: str, req: BenchRequest, start: float,
              timeout: float, temperature: float) -> Result:
    res = Result(req.index, len(req.tokens), priority=req.priority)
    body: dict[str, Any] = {"model": model, "prompt": req.tokens, "max_tokens": req.max_tokens,
                            "temperature": temperature, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}, "priority": req.priority}
    t0 = time.perf_counter()
    res.sent_s = t0 - start
    times: list[float] = []
    try:
        async with session.post(base_url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                err = (await r.json()).get("error", {})
                res.status, res.error = (err.get("code") or f"HTTP_{r.status}").upper(), err.get("message", "")
                return res
            routing = r.headers.get("x-pdserve-routing", "")
            async for line in r.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[len(b"data: "):])
                if "error" in chunk:
                    res.status, res.error = (chunk["error"].get("code") or "UNKNOWN").upper(), chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.cached_tokens = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
                for choice in chunk.get("choices", ()):
                    if choice.get("text") or choice.get("finish_reason"):
                        times.append(time.perf_counter() - t0)
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
    except TimeoutError:
        res.status, res.error = "DEADLINE_EXCEEDED", f"no answer within {timeout:g} s"
        return res
    except aiohttp.ClientError as e:
        res.status, res.error = "UNAVAILABLE", repr(e)
        return res
    fields = dict(part.split("=", 1) for part in routing.split("; ") if "=" in part)
    res.disaggregated = fields.get("disaggregated") == "true"
    res.decode_instance, res.prefill_instance = fields.get("decode", ""), fields.get("prefill", "")
    res.e2e_s = time.perf_counter() - t0
    res.token_times = times
    if times:
        res.ttft_s = times[0]
        if res.output_tokens > 1:
            res.tpot_s = (times[-1] - times[0]) / (res.output_tokens - 1)
    return res
