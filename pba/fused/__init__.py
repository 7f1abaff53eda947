"""A fused CPU training step for :class:`pba.models.imdb.IMDBClassifier`: the same function, written out.

An optional part of ``pba`` (``import pba`` does not import it). The model in :mod:`pba.models` is
the specification. On a CPU its training step is dominated not by arithmetic but by the glue
between some two hundred small PyTorch operators (see ``benchmarks/imdb_floor.py``).
:class:`FusedIMDBStep` computes the same loss and the same gradients in one call into a small C++
extension (``pba/fused/csrc/imdb_step.cpp``, compiled on first use with the system's C++
compiler, laid out like llm.c's ``train_gpt2.c``: named parameter, gradient and activation
structs, a forward and a backward function per layer): every matrix product, the learned ones
and the four of each (review, head) pair's attention, goes through one small register-tiled
matrix multiply, and the softmax, the layer norms, dropout, pooling and the loss are plain loops
over data that fits in the L1 cache, with the backward pass derived by hand.

:class:`FusedEngine` is the engine :func:`pba.train.fit` drives (a whole epoch per C++ call).
The model's parts are found by name (:func:`imdb_parts`, :data:`PARAMETER_SLOTS`).

``tests/test_fused.py`` checks loss, logits and every gradient against autograd through the
PyTorch model, for every variant and option, given the same dropout masks. Dropout draws its
masks from a counter-based hash of ``(seed, step, site, index)``, so a fused run is deterministic
but does not draw the masks that ``torch.nn.Dropout`` would: its numbers differ from an autograd
run's in the way two seeds do.
"""

from . import step
from .step import *  # noqa: F403 (the names step.__all__ lists)

__all__ = step.__all__
