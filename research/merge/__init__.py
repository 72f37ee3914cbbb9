"""Weight averaging and merging: soups, task arithmetic, TIES, DARE, SLERP, Fisher and the rest
as functions over parameter trees (``trees``), one tensor at a time (``kernels``), streamed over
Hugging Face checkpoints (``stream``, ``mergekit_config``) and over sharded orbax checkpoints."""
