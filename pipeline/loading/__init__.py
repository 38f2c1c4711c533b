"""Loading: the meta skeleton, the shard streamer, tensors placed into the model, offload hooks.

Everything here follows a Plan (planning/); nothing here decides where a tensor goes.
"""
