"""Integrations with training frameworks that build the optimizer themselves.

- :mod:`badam_ext.integrations.llamafactory`: LlamaFactory's ``use_badam: true`` path with BlockAdam
  (``badam-ext-llamafactory train cfg.yaml``).

Hugging Face Trainer and TRL need no patching: see :mod:`badam_ext.hf`.
"""
