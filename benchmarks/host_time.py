"""Where eager inference time goes, on one GPU: for vim_small and dyvm_vim_small (token keep 0.7, gates
calibrated to the authors' realised block keep ratio), batch 128 of 224x224, no_grad, fp32 and bf16 autocast:
  1. host time (until model(x) returns, no sync) and total time (until the GPU is done), medians of 15 forwards
     after 10 warm-ups: host close to total means the host sets the pace;
  2. cProfile of 5 bf16 forwards (host cost per call);
  3. torch.profiler over 3 forwards after 5 warm-ups, kernels sorted by their own GPU time.

    PYTHONPATH=mamba-1p1p1:. python3 benchmarks/host_time.py > host_time.txt
"""
import cProfile
import io
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model


def main():
    x = torch.randn(128, 3, 224, 224, device="cuda")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(name, "cuda", block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO)
        for dtype in (None, torch.bfloat16):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                for _ in range(10):
                    model(x)
                host, total = [], []
                for _ in range(15):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    model(x)
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    host.append(t1 - t0)
                    total.append(time.perf_counter() - t0)
                print(f"{name:15s} {str(dtype):15s} host {1e3 * statistics.median(host):7.2f} ms  "
                      f"total {1e3 * statistics.median(total):7.2f} ms", flush=True)
                if dtype is not None:
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(5):
                        model(x)
                    torch.cuda.synchronize()
                    prof.disable()
                    text = io.StringIO()
                    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
                    print(text.getvalue())
                with profile(activities=[ProfilerActivity.CUDA]) as gpu:
                    for _ in range(3):
                        model(x)
                    torch.cuda.synchronize()
            print(f"===== {name} {dtype} (3 forwards)")
            print(gpu.key_averages().table(sort_by="self_cuda_time_total", row_limit=32, max_name_column_width=70))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
