"""What the training benchmarks share: device sync, memory reset between the two models, peak memory."""
import gc

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
