"""The host side of KV swapping: a pool of host blocks shaped like the device cache's, and the
copies between the two that the scheduler orders with each step."""

from __future__ import annotations

import time

import torch

from hetserve.model.attention import KVLayerCache


class HostKVCache:
    def __init__(self, device_caches: list[KVLayerCache], num_blocks: int, device: torch.device):
        # Pinned on GPU hosts: copies from pageable memory go through a staging buffer at half speed.
        pin = device.type == "cuda"
        self.caches = [
            tuple(torch.zeros((num_blocks, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for t in layer)
            for layer in device_caches
        ]

    def swap(self, device_caches: list[KVLayerCache], swap_out: list[tuple[int, int]],
             swap_in: list[tuple[int, int]]) -> float:
        """Copy (device, host) pairs out, then (host, device) pairs in; returns the seconds taken."""
        start = time.perf_counter()
        device = device_caches[0][0].device
        if swap_out:
            source, target = _indices(swap_out, device), _indices(swap_out, torch.device("cpu"), 1)
            for device_layer, host_layer in zip(device_caches, self.caches):
                for device_tensor, host_tensor in zip(device_layer, host_layer):
                    host_tensor[target] = device_tensor[source].cpu()
        if swap_in:
            source, target = _indices(swap_in, torch.device("cpu")), _indices(swap_in, device, 1)
            for device_layer, host_layer in zip(device_caches, self.caches):
                for device_tensor, host_tensor in zip(device_layer, host_layer):
                    device_tensor[target] = host_tensor[source].to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the time is the scheduler's estimate of what a swap costs
        return time.perf_counter() - start


def _indices(pairs: list[tuple[int, int]], device: torch.device, column: int = 0) -> torch.Tensor:
    return torch.tensor([pair[column] for pair in pairs], dtype=torch.int64, device=device)
