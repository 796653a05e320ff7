"""The contract every Loomis service shares: settings, job specs, queues, events, storage.

Nothing here imports torch or FastAPI, so the gateway installs light.
"""
