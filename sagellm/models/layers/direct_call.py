"""`DirectCall`: modules that a decode step calls on every layer skip nn.Module's call dispatch.

nn.Module.__call__ goes through two Python frames, a tracing-state query and eight hook tables
before it reaches forward: about 1.2 us a call on the 2-core dev CPU, against 0.45 us here. A
SmolLM2 decode step makes ~270 such calls (30 layers), so this saves ~0.5 ms of a ~10 ms step
(measured: 10.8 -> 10.3 ms at one thread). Forward hooks and pre-hooks still work: when any is
set, the call takes nn.Module's path.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _module


class DirectCall:
    """Mix in before nn.Module: `class Linear(DirectCall, nn.Module)`."""

    def __call__(self, *args, **kwargs):
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or _module._global_forward_hooks
            or _module._global_forward_pre_hooks
        ):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)
