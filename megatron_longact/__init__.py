"""megatron-longact: LongAct saliency-guided sparse W_Q/W_K updates for RL on megatron-core.

Entry point for any megatron-core training loop::

    handle = megatron_longact.install(model_chunks, optimizer, LongActConfig(keep_ratio=0.3))
"""

__version__ = "0.1.0"


def install(*args, **kwargs):
    """See :func:`megatron_longact.longact.optimizer.install`."""
    from megatron_longact.longact.optimizer import install as _install

    return _install(*args, **kwargs)


def __getattr__(name):
    if name == "LongActConfig":
        from megatron_longact.longact.config import LongActConfig

        return LongActConfig
    raise AttributeError(name)
