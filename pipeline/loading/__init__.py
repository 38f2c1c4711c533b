"""Loading: the meta skeleton, the shard streamer, tensors placed into the model, offload hooks,
and the read-ahead of cold shards.

Everything here follows a Plan (planning/); nothing here decides where a tensor goes.
"""
