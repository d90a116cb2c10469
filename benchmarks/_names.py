"""Provider names and labels of the IMQ MMD benchmarks, in one place (torch-free: report.py imports it too)."""

PROVIDERS = ("per_bandwidth", "vectorised", "compiled", "keops", "fused_triton", "fused_cuda", "fused_cpu")
BASELINES = ("per_bandwidth", "vectorised", "compiled", "keops")
FUSED = ("fused_triton", "fused_cuda", "fused_cpu")
#: Long labels, stored in each result's extra_info.
LABELS = {
    "per_bandwidth": "per-bandwidth (eager)",
    "vectorised": "vectorised (eager)",
    "compiled": "torch.compile(vectorised)",
    "keops": "KeOps LazyTensor",
    "fused_triton": "fast_imq_mmd triton",
    "fused_cuda": "fast_imq_mmd cuda",
    "fused_cpu": "fast_imq_mmd cpu",
}
#: Short labels, for the report's table headers.
SHORT_LABELS = {
    "per_bandwidth": "per-bandwidth (eager)",
    "vectorised": "vectorised (eager)",
    "compiled": "torch.compile",
    "keops": "KeOps",
    "fused_triton": "fused triton",
    "fused_cuda": "fused cuda",
    "fused_cpu": "fused cpu",
}
