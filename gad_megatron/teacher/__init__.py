"""One client for every OpenAI-compatible chat endpoint: the teacher and, later, the LLM judge.

- :mod:`.client`: :class:`~.client.ChatClient` sends one chat completion (teacher-side system
  prompt and few-shot context prepended) and applies the retry policy of :mod:`.retry`:
  jittered exponential backoff on 408, 409, 429, 5xx, timeouts, dropped connections and
  unreadable responses, honouring ``Retry-After``. The ``openai`` client's own retries are off
  (``max_retries=0``) so there is exactly one policy.
- :mod:`.bulk`: :func:`~.bulk.run_requests_with_stats` answers many requests with bounded concurrency, a
  progress bar and a durable cache (:mod:`gad_megatron.cache`): each answer is committed before
  it counts as done, so a killed run resumes without asking again, and a repeated run asks nothing.
- :mod:`.results`: what comes back: :class:`~.results.Completion` (with quality flags) and the
  batch counters :class:`~.results.RequestStats` (tokens, cost).

Failures are results, not exceptions: after ``max_attempts`` (or at once for a non-retryable
error) a ``Completion`` comes back with ``error`` set. Failures are not cached, so the next
run asks again for them and only them. 401/403/404 mean the endpoint, model or key is wrong for
every request: after the first one, the remaining requests are not sent.

The API key is read from the environment variable the config names and is never logged, stored,
or put into an error message (it is redacted from any server text we keep).
"""
