"""A vLLM-compatible engine simulator: the engine model (pure), its HTTP server and its CLI.

``tokenscaler sim`` stands in for a vLLM replica where there is no GPU. The engine model
(:mod:`tokenscaler.sim.engine`) reproduces vLLM V1's continuous batching over a paged KV
cache, with a step time calibrated per profile (:mod:`tokenscaler.sim.profile`); it takes
``now`` as an argument, so the same model runs in real time behind the server
(:mod:`tokenscaler.sim.server`, its other APIs in :mod:`tokenscaler.sim.endpoints`, both
running requests through one lifecycle in :mod:`tokenscaler.sim.session`) and in virtual
time inside experiments.

Token counting: there is no tokenizer. Prompt tokens are counted, and output budgets
resolved, by the shared rule in :mod:`tokenscaler.core.tokens` (text is
``ceil(utf-8 bytes / 4)`` tokens; a chat adds 3 tokens of reply priming and 4 per message;
completions prompts may also be token ids or batches). The sidecar uses the same functions,
so its estimates equal the ``usage`` this simulator reports. Generated text is filler made
of 4-byte pieces, so counting the streamed text by the same rule gives
``usage.completion_tokens`` back.
"""
