"""Speculative decoding: proposers (cheap guesses of the next tokens) and the lossless
accept/resample rule that verifies them against the target model in one batched step.

Draft tokens are scheduled tokens of their request (the scheduler), the runner scores them,
`rejection.py` decides what is kept and the KV manager rolls back the rest.
"""
