"""lmforge: cheap training of large-vocabulary language models.

Three systems in one library:

* :mod:`lmforge.cce` -- Cut Cross-Entropy, the language-model loss without the logit matrix.
* :mod:`lmforge.prefs` -- multi-turn iterative preference learning for tool-using math agents.
* :mod:`lmforge.evolve` -- population-based evolution of LoRA adapters (GENOME / GENOME+).
"""

__version__ = "0.1.0"
