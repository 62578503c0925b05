"""The chat API's routes and what they share, one module per resource (cf. vLLM's `entrypoints`).

`services.app.build_app` assembles them: `deps` (authentication, the rollout), `errors` (the
OpenAI error shape and the exception handlers), then one router per resource: `probes`, `chat`
(served by `chat_serving`, planned by `pairing`, parameters from `sampling`), `feedback`, `admin`.
"""
