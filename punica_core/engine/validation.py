"""The checks a request passes before it is queued, shared by one engine and the cluster."""
from __future__ import annotations

from ..errors import InvalidRequestError, PromptTooLongError, UnknownAdapterError
from .sampling import SamplingParams


def check_request(ids: list[int], params: SamplingParams, adapter: str | None, store,
                  max_model_len: int, kv_blocks: int, block_size: int,
                  resume_output_ids: list[int] | None = None) -> None:
    """Raises the error that names what is wrong; kv_blocks: the most blocks one engine has."""
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens; this server's context "
                                 f"is {max_model_len} tokens")
    if adapter is not None and adapter not in store:
        raise UnknownAdapterError(f"unknown adapter {adapter!r}")
    if -(-(len(ids) + 1) // block_size) > kv_blocks:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens, more than the KV cache "
                                 "holds")
    if resume_output_ids and len(resume_output_ids) >= params.max_tokens:
        raise InvalidRequestError("nothing left to generate: max_tokens already reached")
