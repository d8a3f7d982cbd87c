"""bitlm inside other frameworks.  ``bitlm.integrations.transformers``: packed native kernels
behind transformers' ``BitNetForCausalLM`` (``accelerate(model)`` and the registered ``bitlm``
quantization method).  Each integration imports its framework only when it is imported."""
