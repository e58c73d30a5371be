"""The bottom layer: rollout batches, chunked log-probs, divergences, top-k, advantages, metrics, errors, checks.

Nothing here imports Lightning, vLLM, transformers or any other ``rlad_pl`` folder."""
