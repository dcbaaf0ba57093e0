"""Triton device helpers shared by the kernels of both packages (triton_causal_conv1d.py and mamba_ssm's
ops/triton/selective_scan.py). A leaf: imports Triton and nothing of either package."""
import triton
import triton.language as tl


@triton.jit
def pick4(v0, v1, v2, v3, j: tl.constexpr):
    """v_j for a compile-time j (selecting among values loaded ahead of use)."""
    v = v0
    if j == 1:
        v = v1
    if j == 2:
        v = v2
    if j == 3:
        v = v3
    return v


# Host-side launch arithmetic in plain integers: triton.cdiv / triton.next_power_of_2 are constexpr functions
# whose host calls cost a microsecond or more each, several times per layer of every eager forward.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
