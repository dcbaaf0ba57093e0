"""One training-mode call of the DyVM bidirectional op at Vim-S shapes (batch 128, L 197, d_inner 768,
d_state 16), forward and backward, for Nsight Compute to read the scan backward kernel's counters:

    ncu --kernel-name _scan_bwd_kernel --launch-skip 1 --launch-count 1 \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum \
        python3 benchmarks/scan_bwd_profile.py --dtype bf16
(the first call compiles and warms up; the second is measured).
"""
import argparse

import torch

from mamba_ssm.modules.mamba_simple import Mamba


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    mixer = Mamba(384, bimamba_type="v2", if_divide_out=True).cuda()
    x = torch.randn(args.batch, 197, 384, device="cuda", requires_grad=True)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for _ in range(2):
        with torch.autocast("cuda", dtype=dtype, enabled=args.dtype == "bf16"):
            y = mixer(x)
        y.float().square().mean().backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
