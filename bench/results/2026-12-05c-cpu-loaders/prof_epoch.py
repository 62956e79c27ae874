import time, cProfile, pstats, torch
torch.set_num_threads(1)
from memstrata.data import TieredLoader
lo = TieredLoader("/tmp/loader-b/synth1024", 128, seed=0, epochs=4, device="cpu", store_dir="/tmp/loader-b/store1024", num_workers=1, prefetch=0, progress=False)
for _ in lo: pass
t0=time.thread_time()
for _ in lo: pass
print("epoch us/img", (time.thread_time()-t0)/lo.n*1e6)
pr=cProfile.Profile(); pr.enable()
for _ in lo: pass
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(18)
