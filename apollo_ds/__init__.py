"""apollo_ds: Apollo progressive pretraining of GPT on DeepSpeed and megatron-core."""
__version__ = "0.1.0"

from apollo_ds import quiet as _quiet

_quiet.install()     # the dependencies' known start-up noise, filtered by message
