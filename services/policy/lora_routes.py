"""vLLM's dynamic LoRA routes on the policy server: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``. Success is a plain-text sentence, as vLLM answers;
errors are 400/404 in OpenAI's shape (``lora_invalid``, ``lora_not_found``,
``lora_mismatch``, ``lora_already_loaded``, ``lora_path_not_allowed``).

A replica that follows the ``weights`` stream loads published adapters by itself; these
routes remain for operators and for gateways told the upstream is a plain vLLM
(``upstream_kind = "vllm"``). Paths are confined like the follower's (``paths.py``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, Response

from services.policy.lora import AdapterError
from services.policy.registry import AdapterNotFoundError
from services.policy.schemas import (
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
    error_response,
)

if TYPE_CHECKING:
    from services.policy.app import PolicyState

log = logging.getLogger(__name__)


def _not_ready(state: PolicyState) -> Response:
    return error_response(503, state.load_error or "the model is still loading",
                          "service_unavailable", code="model_not_ready")


def add_lora_routes(app: FastAPI, state: PolicyState) -> None:
    """Add the load and unload routes."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraAdapterRequest) -> Response:
        if state.adapters is None:
            return _not_ready(state)
        if not req.lora_name or not req.lora_path:
            return error_response(400, "Both 'lora_name' and 'lora_path' must be provided.",
                                  "invalid_request_error", code="lora_invalid")
        try:
            await state.load_adapter(req.lora_name, req.lora_path, replace=req.load_inplace)
        except AdapterError as exc:
            log.info("policy.lora_load_refused name=%s code=%s", req.lora_name, exc.code)
            state.metrics.adapter_changes.labels("load", "refused").inc()
            return error_response(400, str(exc), "invalid_request_error", exc.param,
                                  exc.code)
        state.metrics.adapter_changes.labels("load", "ok").inc()
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraAdapterRequest) -> Response:
        if state.adapters is None:
            return _not_ready(state)
        if not req.lora_name:
            return error_response(400, "'lora_name' must be provided.",
                                  "invalid_request_error", "lora_name", "lora_invalid")
        try:
            state.adapters.unload(req.lora_name)
        except AdapterNotFoundError:
            state.metrics.adapter_changes.labels("unload", "not_found").inc()
            return error_response(404, f"The lora adapter '{req.lora_name}' cannot be found.",
                                  "not_found_error", "lora_name", "lora_not_found")
        state.metrics.adapter_changes.labels("unload", "ok").inc()
        return PlainTextResponse(
            f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
