"""Same-process A/B of two inference choices, on one GPU: the scan forward with one program per layer running
both directions ("joint") or a program per direction ("split", the default on the mixer's layout), and the
patch embedding through cuDNN's Conv2d or as a matmul over the patches (the default).

Kernel level: the stacked two-direction scan forward of a Vim-S layer (batch 128, d_inner 768, d_state 16,
channel-contiguous, softplus, D, z, delta_bias, scale 0.5) at L 197 and 68, gates none or random with
P(on) = keep; triton.testing.do_bench medians of eager launches, us.
Model level: vim_small and dyvm_vim_small (token keep 0.7, gates calibrated to the authors' realised block keep
ratio, AUTHORS_REALISED_BLOCK_KEEP_RATIO), batch 128 of 224x224,
CUDA-graph replays (dyvm.benchmark.measure_throughput), images/s for the four combinations.

    PYTHONPATH=mamba-1p1p1:. python3 benchmarks/ab_scan_patch.py > ab.txt
"""
import torch

from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model, measure_throughput
from dyvm.models import vim
from mamba_ssm.ops.triton import selective_scan as ss

BATCH, DIM, D_STATE = 128, 768, 16


def conv_patch_embed(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


def kernel_rows():
    import triton

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # noqa: E731
    print("kernel us: dtype L keep joint split")
    for dtype in (torch.bfloat16, torch.float32):
        for L in (197, 68):
            act = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
            u, delta = act(2, BATCH, L, DIM).transpose(2, 3), (act(2, BATCH, L, DIM) * 0.5 - 1).transpose(2, 3)
            z = act(BATCH, L, DIM).transpose(1, 2)
            B, C = act(2, BATCH, 1, D_STATE, L), act(2, BATCH, 1, D_STATE, L)
            A = -torch.exp(torch.rand(2, DIM, D_STATE, device="cuda") * 2)
            D, bias = torch.randn(2, DIM, device="cuda"), torch.rand(2, DIM, device="cuda") - 4
            out = torch.empty(BATCH, L, DIM, device="cuda", dtype=dtype).transpose(1, 2)
            for keep in (None, 1.0, 0.75, 0.5):
                gate = None if keep is None else (torch.rand(BATCH, 2, device="cuda") < keep).float()
                t = [bench(lambda: ss.scan_forward(u, delta, A, B, C, D, z, bias, True, gate, 0.5, out,
                                                   split_dirs=split)) for split in (False, True)]
                print(f"  {str(dtype)[6:]:8s} {L:4d} {str(keep):5s} {t[0]:7.1f} {t[1]:7.1f}", flush=True)


def model_rows():
    matmul_patch_embed = vim.PatchEmbed.forward
    print("model images/s (CUDA graph): model dtype | joint+conv, split+conv, joint+matmul, split+matmul")
    for name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(name, "cuda", block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO)
        for dtype in (None, torch.bfloat16):
            row = []
            for embed in (conv_patch_embed, matmul_patch_embed):
                vim.PatchEmbed.forward = embed
                for split in (False, True):
                    for key in ("cl/2", "cl/4"):
                        ss.FWD_TUNING[key]["split_dirs"] = split
                    row.append(measure_throughput(model, BATCH, 224, 3, "cuda", dtype, 10, 30,
                                                  mode="cuda_graph")["images_per_s"])
            vim.PatchEmbed.forward = matmul_patch_embed
            print(f"  {name:15s} {str(dtype):14s} " + " ".join(f"{v:8.1f}" for v in row), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    kernel_rows()
    model_rows()
