"""The request path every endpoint shares, HTTP apart: a request body becomes a job (the model
resolved, the prompt tokenized, the lengths checked), then is admitted and enqueued, its replies
subscribed to first. The gateway's endpoints and the batch feature both go through it, so a batch
line is held to the same rules as a request."""

from __future__ import annotations

import hashlib
import secrets
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from api.assembly import Family, FullAssembler, Meta, StreamAssembler
from api.chat.assembly import CHAT, ChatFull, ChatStream, ChoiceParser
from api.chat.protocol import ChatCompletionRequest
from api.common import GenerationRequest
from api.completions.assembly import TEXT, Echo, TextFull, TextPlan, TextStream
from api.completions.protocol import CompletionRequest
from api.errors import InvalidRequest, ModelNotFound, Unavailable
from serving.admission import Admission, default_output
from serving.dispatch import Dispatcher
from serving.lifecycle import Lifecycle
from serving.registry import ModelEntry, WorkerRegistry
from serving.relay import Admitted
from serving.replies import own_request_prefix
from serving.tokenizer import PromptBuilder, TokenizerCache
from shared.messages import Job
from shared.tenants import CacheScope, Tenant, cache_salt


@dataclass
class Prepared:
    """A request made into a job, and what assembling its answer needs."""

    job: Job
    family: Family
    id_prefix: str
    parsers: list[ChoiceParser] | None = None
    """One per choice when the answer is parsed (tool calls, reasoning), else None."""
    top_logprobs: int | None = None
    """Alternatives per token when the answer carries log probabilities, else None."""
    json_held: bool = False
    """A grammar holds the answer to JSON (see ``api.chat.assembly.escape_controls``)."""
    extra: dict[str, Any] = field(default_factory=dict)
    text: TextPlan | None = None
    """How a text completion's answer is assembled (echo, log probabilities, several prompts)."""
    fan: tuple[Job, ...] = ()
    """The other jobs of a request of several prompts (``job`` is the first prompt's): the request
    is admitted and answered as one (:mod:`serving.fanout`)."""
    request_id: str = ""
    """The request's id, when its jobs have ids of their own (``fan``)."""

    @property
    def jobs(self) -> tuple[Job, ...]:
        return (self.job, *self.fan)

    @property
    def rich(self) -> bool:
        return self.parsers is not None or self.top_logprobs is not None or self.json_held

    def meta(self) -> Meta:
        job = self.job
        return Meta(
            id=self.id_prefix + (self.request_id or job.id).removeprefix("req_"),
            created=int(job.created_at),
            model=job.model,
            family=self.family,
        )

    def streaming(self, body: GenerationRequest) -> StreamAssembler:
        prompt = sum(len(job.prompt_token_ids) for job in self.jobs)
        usage, continuous = body.include_usage(), body.continuous_usage()
        if self.text is not None and self.text.rich:
            return TextStream(self.meta(), usage, continuous, prompt, plan=self.text)
        if self.rich:
            return ChatStream(
                self.meta(),
                usage,
                continuous,
                prompt,
                parsers=self.parsers,
                top=self.top_logprobs,
                json_held=self.json_held,
            )
        return StreamAssembler(self.meta(), usage, continuous, prompt)

    def whole(self) -> FullAssembler:
        if self.text is not None and self.text.rich:
            return TextFull(self.meta(), plan=self.text)
        if self.rich:
            return ChatFull(
                self.meta(), parsers=self.parsers, top=self.top_logprobs, json_held=self.json_held
            )
        return FullAssembler(self.meta())


@dataclass
class JobBuilder:
    """A request body becomes a job, or a 4xx: resolve the model, tokenize, check the lengths."""

    registry: WorkerRegistry
    tokenizers: TokenizerCache
    max_n: int
    affinity_tokens: int = 0
    cache_scope: CacheScope = "tenant"

    async def resolve(self, model: str) -> ModelEntry:
        if (entry := await self.registry.find(model)) is not None:
            return entry
        if await self.registry.known(model):
            raise Unavailable(f"no live worker serves the model '{model}' right now", retry_after=5)
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    async def chat(
        self, entry: ModelEntry, body: ChatCompletionRequest, tenant: Tenant, job_id: str
    ) -> Prepared:
        generation_only(entry, "Chat Completions")
        tokens = await self.tokenizers.get(entry.tokenizer)
        check_length(tokens, sum(len(m.text()) for m in body.messages), entry.max_model_len, "messages")
        check_token_ids(tokens, body)
        plan, prompt = await tokens.chat_async(body, entry.answering, entry.max_logprobs)
        top = body.wants_logprobs()
        job = self._job(
            job_id,
            tenant,
            entry,
            body,
            prompt,
            body.output_limit(),
            param="messages",
            decided={
                "structured_output": plan.structured_output,
                "logprobs": top,
                "skip_special_tokens": plan.skip_special_tokens,
            },
            steps=plan.steps,
            reasoning_ended=plan.reasoning_ended(prompt),
        )
        so = plan.structured_output
        json_held = so is not None and (so.json_schema is not None or so.json_object)
        return Prepared(job, CHAT, "chatcmpl-", plan.parsers(body.n, prompt), top, json_held)

    async def completion(
        self, entry: ModelEntry, body: CompletionRequest, tenant: Tenant, job_id: str
    ) -> Prepared:
        """One job per prompt: the first keeps the request's id, each of several gets its own."""
        generation_only(entry, "Completions")
        tokens = await self.tokenizers.get(entry.tokenizer)
        given = body.prompts()
        params = ["prompt"] if len(given) == 1 else [f"prompt.{k}" for k in range(len(given))]
        for text, param in zip(given, params, strict=True):
            if isinstance(text, str):
                check_length(tokens, len(text), entry.max_model_len, param)
        if body.logprobs is not None and body.logprobs > entry.max_logprobs:
            raise InvalidRequest(
                f"logprobs may be at most {entry.max_logprobs} for this model", param="logprobs"
            )
        check_token_ids(tokens, body)
        prompts = [await tokens.text_async(text) for text in given]
        # Scoring a prompt (echo, max_tokens 0) still runs one step, as in vLLM: its token is not shown.
        max_tokens = 1 if body.echo_only else body.budget
        decided = {"logprobs": body.logprobs, "prompt_logprobs": body.logprobs if body.echo else None}
        ids = [job_id] if len(prompts) == 1 else [f"{job_id}-{k}" for k in range(len(prompts))]
        jobs = [
            self._job(i, tenant, entry, body, prompt, max_tokens, param=param, decided=decided)
            for i, prompt, param in zip(ids, prompts, params, strict=True)
        ]
        echo = None
        if body.echo:
            echo = tuple(
                Echo(text if isinstance(text, str) else tokens.decode(prompt), tokens.decode(prompt[:1]))
                for text, prompt in zip(given, prompts, strict=True)
            )
        plan = TextPlan(n=body.n, echo=echo, top=body.logprobs, echo_only=body.echo_only)
        fan = tuple(jobs[1:])
        return Prepared(jobs[0], TEXT, "cmpl-", text=plan, fan=fan, request_id=job_id if fan else "")

    def _job(
        self,
        job_id: str,
        tenant: Tenant,
        entry: ModelEntry,
        body: GenerationRequest,
        prompt: list[int],
        max_tokens: int | None,
        param: str,
        decided: dict[str, Any] | None = None,
        steps: bool = False,
        reasoning_ended: bool | None = None,
    ) -> Job:
        if body.n > self.max_n:
            raise InvalidRequest(f"n must be at most {self.max_n}", param="n")
        room = fit_context(len(prompt), max_tokens, entry.max_model_len, param)
        if max_tokens is None:
            max_tokens = default_output(room, len(prompt), body.n, tenant.tpm)
        check_sampling(body, max_tokens)
        salt = cache_salt(tenant, self.cache_scope)
        sampling = body.to_sampling(max_tokens, **(decided or {}))
        return Job(
            v=max(sampling.version, 2 if steps else 1),
            id=job_id,
            tenant=tenant.name,
            model=entry.name,
            prompt_token_ids=tuple(prompt),
            sampling=sampling,
            created_at=time.time(),
            affinity=prefix_digest(prompt, self.affinity_tokens, salt),
            cache_salt=salt,
            steps=steps,
            reasoning_ended=reasoning_ended,
        )


async def submit(
    job: Job,
    tenant: Tenant,
    dispatcher: Dispatcher,
    admission: Admission,
    lifecycle: Lifecycle,
    keep: float | None = None,
) -> Admitted:
    """Admit (rate limits, backlog) and enqueue; the reservation is settled when the reply ends."""
    lifecycle.check_open()  # it may have begun draining while this request was tokenized
    # Subscribed first, then admitted and enqueued in one script: two round trips one after the
    # other, as many as subscribing while admission decides and enqueueing after, and one fewer.
    sub = await dispatcher.subscribe(job)
    try:
        ticket = await admission.admit_enqueue(tenant, job, dispatcher.enqueuing(job, tenant.priority))
    except BaseException:
        await dispatcher.close(sub)
        raise
    return Admitted(dispatcher.follow(job, sub), ticket, admission, lifecycle, keep)


def prefix_digest(prompt: Sequence[int], length: int, salt: str | None = None) -> str | None:
    """A digest of the prompt's first ``length`` tokens, when it has more (see ``Job.affinity``):
    the turns of a conversation, or requests that open with one long system prompt, share it. The
    prefix-cache salt is part of it: prompts that share no cache entries share no digest."""
    if length <= 0 or len(prompt) <= length:
        return None
    digest = hashlib.blake2b(array("l", prompt[:length]).tobytes(), digest_size=8)
    if salt is not None:
        digest.update(salt.encode())
    return digest.hexdigest()


def generation_only(entry: ModelEntry, api: str) -> None:
    """Refuse a request for generated text to an embedding model (a 400 naming ``model``, as
    ``vllm serve`` refuses it)."""
    if entry.embedding is not None:
        raise InvalidRequest(
            f"The model '{entry.name}' is an embedding model and does not support the {api} API",
            param="model",
        )


GREEDY_BELOW = 1e-5
"""vLLM's bound: a temperature below it is greedy decoding, which has one answer to give."""


def check_sampling(body: GenerationRequest, max_tokens: int) -> None:
    """Refuse, before enqueueing, what vLLM's sampling parameters refuse across fields: the engine
    would refuse it only once the job is running, when a stream has already answered 200."""
    if body.min_tokens > max_tokens:
        raise InvalidRequest("min_tokens must not exceed max_tokens", param="min_tokens")
    if body.n > 1 and body.temperature is not None and body.temperature < GREEDY_BELOW:
        raise InvalidRequest(f"n must be 1 with greedy decoding (temperature 0), got {body.n}", param="n")


def check_token_ids(tokens: PromptBuilder, body: GenerationRequest) -> None:
    """Refuse token ids the model lacks, in ``stop_token_ids`` and ``logit_bias``, before enqueueing."""
    tokens.check_ids(body.stop_token_ids or (), "stop_token_ids")
    tokens.check_ids([int(t) for t in body.logit_bias or ()], "logit_bias")


def check_length(tokens: PromptBuilder, chars: int, max_model_len: int, param: str) -> None:
    """Refuse, without encoding it, a prompt too long to fit the context whatever it encodes to."""
    least = tokens.least_tokens(chars)
    if least >= max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, the prompt "
            f"alone has at least {least} tokens. Please reduce the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def fit_context(prompt_len: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """The output budget: ``max_tokens`` if prompt and output fit the context (else a 400), and
    when it is unset the whole room the prompt leaves."""
    if prompt_len == 0:  # e.g. "" with a tokenizer that adds no BOS; the engine would refuse it
        raise InvalidRequest("the prompt is empty: it encodes to no tokens", param=param)
    room = max_model_len - prompt_len
    if max_tokens is None:
        if room < 1:
            raise _too_long(prompt_len, 1, max_model_len, param)
        return room
    if max_tokens > room:
        raise _too_long(prompt_len, max_tokens, max_model_len, param)
    return max_tokens


def _too_long(prompt_len: int, max_tokens: int, limit: int, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
        "completion). Please reduce the prompt or the completion length.",
        param=param,
        code="context_length_exceeded",
    )


def new_request_id() -> str:
    """Unguessable (job ids double as the reply channel name), and begun with this process's tag,
    whose reply channels its hub listens to with one subscription."""
    return own_request_prefix() + secrets.token_hex(12)
