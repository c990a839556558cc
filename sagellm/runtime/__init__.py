"""Engine core: scheduler, KV block manager, model runner, sampler, detokenizer, stop checks.

Each concept lives in its own module (``params``, ``sampler``, ``detokenizer``, ``stop``, ...);
import from those modules directly.
"""
