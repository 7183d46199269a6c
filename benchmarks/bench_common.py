"""What the training benchmarks share: device sync, memory reset between the two models, peak memory."""
import gc
import time

import torch


class Timer:
    def __init__(self, device):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_memory(self):
        """Free what the previous model left; returns bytes still allocated (should be ~0)."""
        torch._dynamo.reset()  # compiled graphs hold references to their model's parameters
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return 0

    def peak_bytes(self):
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        from utils.runtime import peak_rss_bytes
        return peak_rss_bytes()  # CPU: process peak RSS, cumulative over the run (not comparable between models)


def time_training(name, model, loss_fn, steps, warmup, lr, timer, weight_decay=0.0, eager_loss_fn=None):
    """Warm up, then time `steps` optimizer steps of AdamW (fused where the device has it) on loss_fn().

    eager_loss_fn: if the first (compiling) step fails, say why and measure this uncompiled loss instead.
    Returns seconds of the timed steps, warm-up seconds, every loss, whether AdamW was fused, the compile error.
    """
    if timer.cuda:  # the peak counts from here: weights (already there), then gradients, AdamW states, activations
        torch.cuda.reset_peak_memory_stats()
    try:
        opt, fused = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True), True
    except (RuntimeError, TypeError):  # a device without a fused kernel
        opt, fused = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay), False
    losses, compile_error, current = [], None, {"fn": loss_fn}

    def step():
        loss = current["fn"]()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    t_start = time.perf_counter()
    if eager_loss_fn is not None:
        try:
            step()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler failure must not lose the run
            compile_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"warning: torch.compile failed for {name} ({compile_error}); measuring eagerly", flush=True)
            torch._dynamo.reset()
            opt.zero_grad(set_to_none=True)
            current["fn"] = eager_loss_fn
    for _ in range(warmup):
        step()
    timer.sync()
    warmup_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    timer.sync()
    seconds = time.perf_counter() - t0
    return dict(seconds=seconds, warmup_s=warmup_s, losses=[float(x) for x in losses], fused_adamw=fused,
                compile_error=compile_error)
