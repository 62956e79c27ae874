import time, os, numpy as np, torch, zlib
torch.set_num_threads(1)
from memstrata.data.store import SampleStore
st = SampleStore("/tmp/loader-b/store1024", "/tmp/loader-b/synth1024", max_side=160)
n=st.n
idx=np.random.default_rng(0).permutation(n)
for i in idx: st.get(int(i))  # verify crcs
def T(name, fn, reps=3):
    best=1e9
    for _ in range(reps):
        t0=time.thread_time(); fn(); best=min(best,(time.thread_time()-t0)/n)
    print(f"{name:40s} {best*1e6:7.1f} us/img")
T("fetch_many (batches of 128)", lambda: [st.fetch_many(idx[s:s+128]) for s in range(0,n,128)])
T("get", lambda: [st.get(int(i)) for i in idx])
T("advise willneed", lambda: [st.advise(idx[s:s+128],"willneed") for s in range(0,n,128)])
recs=[st._index[int(i)] for i in idx]
fds={}
meta=[(st._chunk_fd(int(r["chunk"])),int(r["offset"]),int(r["nbytes"])) for r in recs]
T("raw preadv into fresh np.empty", lambda: [os.preadv(fd,[np.empty(nb,np.uint8)],off) for fd,off,nb in meta])
big=np.empty(200000,np.uint8)
T("raw preadv into reused buffer", lambda: [os.preadv(fd,[big[:nb]],off) for fd,off,nb in meta])
T("np.empty + fill (page faults)", lambda: [np.empty(nb,np.uint8).fill(0) for fd,off,nb in meta])
T("label", lambda: [st.label(int(i)) for i in idx])
T("is_complete", lambda: [st.is_complete(int(i)) for i in idx])
