"""Token log-probs (+ entropy) of the LM head: reference, chunked custom VJP, Pallas, sharded over a mesh.

See `jaxrl_rm.kernels.logprobs` for the design; `token_logprobs` is the one entry point.
"""

from jaxrl_rm.kernels.logprobs import (
    IMPLS,
    token_logprobs,
    token_logprobs_sharded,
)
from jaxrl_rm.kernels.reference import token_logprobs_reference

__all__ = ["IMPLS", "token_logprobs", "token_logprobs_reference", "token_logprobs_sharded"]
