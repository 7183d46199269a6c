"""Exponential moving average of a model's weights, for evaluation and the best checkpoint.

    ema = EMA(model.parameters(), decay=0.99)
    ...; opt.step(); ema.update()
    with ema.applied():          # the model holds the averaged weights inside the block
        evaluate(model)

The shadow copy is fp32 whatever the parameters' dtype. The decay warms up as min(decay, (1 + n) / (10 + n))
after n updates (TensorFlow's ExponentialMovingAverage with num_updates), so the first averages are not
dominated by the random initialisation.
"""
from contextlib import contextmanager

import torch


class EMA:
    def __init__(self, params, decay):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = [p for p in params]
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self):
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        self.updates += 1
        weight = 1.0 - self.current_decay()
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """Swap the averaged weights into the model for the duration of the block, then restore."""
        backup = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, b in zip(self.params, backup):
                p.copy_(b)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state):
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state holds {len(state['shadow'])} tensors, the model has {len(self.shadow)}")
        for s, t in zip(self.shadow, state["shadow"]):
            if s.shape != t.shape:
                raise ValueError(f"EMA state tensor of shape {tuple(t.shape)} for a parameter of {tuple(s.shape)}")
            s.copy_(t)
        self.updates = state["updates"]
