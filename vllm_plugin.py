"""vLLM plugin: serve Florence-VL checkpoints with vLLM, unchanged (`vllm serve <florence-vl folder>`).

vLLM finds `register` through the `vllm.general_plugins` entry point of this package and calls it in every
process it starts. It registers the config (so `--trust-remote-code` is not needed) and the model class; the
model itself (`florence_vl.vllm_model`) is imported by vLLM only when it builds the model.

`RequireAPIKey` is an ASGI middleware for the server's `--middleware` option (see README "Serving"): it asks for
the API key on every route, where vLLM's own `--api-key` guards only some.

This module and `vllm_model` import only the config and processor, which also run on the older transformers
that vLLM pins (>= 5.16.1); `modeling_florence_vl` (transformers >= 5.24) is never imported here.
"""

import hashlib
import hmac
import json
import os

ARCHITECTURE = "FlorenceVLForConditionalGeneration"


def register() -> None:
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .configuration_florence_vl import FlorenceVLConfig

    AutoConfig.register(FlorenceVLConfig.model_type, FlorenceVLConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, f"{__package__}.vllm_model:FlorenceVLForConditionalGeneration")


class RequireAPIKey:
    """Every request needs `Authorization: Bearer $VLLM_API_KEY`, except the health checks `/health` and `/ping`.

    Why: vLLM 0.32's `--api-key` / `VLLM_API_KEY` guards only paths under `/v1`, `/v2`, `/inference` and `/cohere`.
    `/invocations` (its SageMaker route) answers chat completions without the key, and `/tokenize`, `/metrics`,
    ... are open too. Use it as `--middleware florence_vl.vllm_plugin.RequireAPIKey` with the key in the
    `VLLM_API_KEY` environment variable (a middleware cannot see `--api-key`; the environment also keeps the key
    out of the process list). Starlette builds middleware when the server starts, so a missing key stops the start.
    """

    OPEN_PATHS = frozenset({"/health", "/ping"})

    def __init__(self, app) -> None:
        key = os.environ.get("VLLM_API_KEY", "")
        if not key:
            raise ValueError("florence_vl.vllm_plugin.RequireAPIKey needs the API key in the VLLM_API_KEY environment "
                             "variable (e.g. `export VLLM_API_KEY=$(python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))')`); clients send it as the bearer token.")
        self.app = app
        self.key_digest = hashlib.sha256(key.encode()).digest()

    def authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        digest = hashlib.sha256(token.encode()).digest()  # equal lengths for a constant-time comparison
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self.key_digest)

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS"
                or scope["path"] in self.OPEN_PATHS or self.authorized(scope)):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})  # policy violation
        body = json.dumps({"error": "Unauthorized: send the API key as `Authorization: Bearer <key>`."}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
