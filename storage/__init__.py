"""The on-disk flash store: checkpoint reading, store format, converter, reader, throttle.

Knows nothing of the engine (imports point flashinfer -> predictors -> storage).
"""
