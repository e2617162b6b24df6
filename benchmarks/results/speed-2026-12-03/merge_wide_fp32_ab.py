"""A/B for this session's change to soe_sdk/soup.py::_combine_rows (run from the repository root)."""
import sys, time, statistics, tempfile
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import merge_bandwidth as mb
import soe_sdk
from soe_sdk import fused, soup as soupmod
kernel_first = soupmod._combine_rows  # this commit: the kernel for float32 rows too
def orig(base, alpha, rows, out):  # before it: torch's GEMM for rows already in out's dtype
    if rows.dtype == out.dtype and (base is None or base.dtype == out.dtype):
        soupmod.add_combination(out if base is None else base, alpha, rows, out=out)
    elif not fused.fused_combination(base, alpha, rows, out):
        raise AssertionError("not reached for float32 archives")
d = Path(tempfile.mkdtemp())
def med(fn, r=21):
    t=[]
    for _ in range(r):
        s=time.perf_counter(); fn(); t.append(time.perf_counter()-s)
    return statistics.median(t)*1e3
for size in sys.argv[1:]:
    path = d / f"{size}.soe"
    mb.build_archive(path, mb.SIZES[size], torch.float32)
    soup = soe_sdk.load(path)
    alpha = torch.randn(16, generator=torch.Generator().manual_seed(0))
    arrays = mb.numpy_arrays(soup); a = alpha.numpy()
    ref = soup.instantiate(alpha)
    res = {"numpy": [], "torch-gemm": [], "kernel": []}  # 3 interleaved rounds of 21-run medians, ms
    for rnd in range(3):
        res["numpy"].append(med(lambda: [s + a @ e for s, e in arrays]))
        soupmod._combine_rows = orig; soup.instantiate(alpha)
        res["torch-gemm"].append(med(lambda: soup.instantiate(alpha)))
        soupmod._combine_rows = kernel_first; th = soup.instantiate(alpha)
        res["kernel"].append(med(lambda: soup.instantiate(alpha)))
    soupmod._combine_rows = orig
    diff = max(float((th[k]-ref[k]).abs().max()) for k in ref)
    n = statistics.median(res["numpy"])
    print(size, {k: [round(x,2) for x in v] for k,v in res.items()}, "ratio gemm %.2f kernel %.2f" % (statistics.median(res["torch-gemm"])/n, statistics.median(res["kernel"])/n), "maxdiff", diff)
