"""Per-head KV-cache compression calibrated from the sink profile (DuoAttention-style, training-free).

* `sinkscope.kv.mass`: each kv head's attention mass on the sinks, the recent window and the distant rest.
* `sinkscope.kv.policy`: `KVPolicy`, which kv heads keep the full cache (files: policy.json + DuoAttention's
  pattern format, `sinkscope.kv.duo_format`).
* `sinkscope.kv.calibrate`: `calibrate`, a policy from calibration text, by byte budget or by measured KL.
* `sinkscope.kv.attention`: the policy's dense per-head mask (the reference) and the split attention function.
* `sinkscope.kv.cache`: `headwise_cache`, a transformers Cache that stores full heads and streaming heads in
  separate, smaller tensors.
"""
