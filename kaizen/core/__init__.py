"""The shared floor: what both the online side (services/) and the offline side (trainer/) stand on.

Settings (one `Settings`, prefix `KAIZEN_`), the preference-event schema, the model registry and its
version folders, atomic file writes, the rounds log, logging setup, hardware and dtype choice, disk
checks, retention, model events, the Prometheus metrics, the broker and its topics, and how vLLM is
configured. It imports nothing from services/, trainer/, simulation/ or the CLI (tests/test_layering.py),
so the chat API installs and type-checks without the trainer, and the trainer without the API.
"""
