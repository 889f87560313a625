"""Sequence primitives, each with an XLA reference path and a Pallas Mosaic GPU kernel.

impl="xla" is the reference path; impl="pallas" the kernel (interpreted on the CPU);
impl="auto" the kernel on a Hopper GPU where it is faster and takes the call, else XLA.
The *_seq_parallel variants (seq_parallel.py) split the length over a mesh axis.
"""

from ssm.ops.causal_conv import causal_conv1d
from ssm.ops.fft_conv import fft_conv
from ssm.ops.lightning_attention import lightning_attention
from ssm.ops.linear_scan import linear_scan
from ssm.ops.selective_scan import selective_scan
from ssm.ops.seq_parallel import (lightning_attention_seq_parallel, linear_scan_seq_parallel,
                                  selective_scan_seq_parallel, ssd_seq_parallel)
from ssm.ops.ssd import ssd

__all__ = ["causal_conv1d", "fft_conv", "lightning_attention", "lightning_attention_seq_parallel", "linear_scan",
           "linear_scan_seq_parallel", "selective_scan", "selective_scan_seq_parallel", "ssd",
           "ssd_seq_parallel"]
