"""The CPU floor of the loader scenario's per-image work, and where TieredLoader's time goes.

The work per image: from a decoded uint8 sample (short side 160, HWC), RandomResizedCrop(224) (bilinear,
antialiased) + horizontal flip + ImageNet normalisation, written as float32 into a (B, 3, 224, 224) batch.
Everything here runs on ONE thread (torch.set_num_threads(1)) and reports CPU time per image
(time.thread_time), so a loaded box changes it less than wall time.

Rows:
  floor: resize only      the uint8 AA bilinear resize of each crop (torch's AVX kernel, channels-last),
                          crops already in memory, no output written: the resampling cost alone.
  floor: write only       converting an already-resized uint8 (B, 224, 224, 3) batch into the normalised
                          float32 (B, 3, 224, 224) output with the fastest single kernel we have
                          (the fused per-sample path's second half), i.e. the output write.
  floor: write only (compiled)  the same with memstrata.data.kernels' one-pass kernel (numba), the path
                          the loader takes when numba is installed.
  floor: resize + write   both, per sample, into a reused output: the least work that produces the
                          exact output (no store reads, no parameter draws, no Python bookkeeping
                          beyond one loop over samples).
  memstrata: augment      TrainAugment.__call__ on a batch (the loader's augmentation step).
  memstrata: read         SampleStore.fetch_many of a batch (pread + labels; crc verified on first read).
  memstrata: loader       TieredLoader(prefetch=0, num_workers=1) epochs 2.., everything included.

Usage: PYTHONPATH=src python bench/loader_floor.py STORE_ROOT_IMAGEFOLDER STORE_DIR [--batches N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def _per_image(fn, images: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, (time.thread_time() - t0) / images)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("store")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from memstrata.data import TieredLoader, TrainAugment
    from memstrata.data.augment import OutputPool, resized_crop_fused
    from memstrata.data.store import SampleStore

    st = SampleStore(a.store, a.root, max_side=160)
    B, nb = a.batch, a.batches
    n = B * nb
    idx = np.arange(n) % st.n
    imgs = [st.get(int(i)) for i in idx]
    aug = TrainAugment()
    boxes, flips = aug.params(0, 1, idx, [x.shape[0] for x in imgs], [x.shape[1] for x in imgs])
    up = torch._C._nn._upsample_bilinear2d_aa
    crops = [np.ascontiguousarray(imgs[k][t:t + h, l:l + w]) for k, (t, l, h, w) in enumerate(boxes.tolist())]
    cts = [torch.from_numpy(c).as_strided((1, 3, c.shape[0], c.shape[1]), (c.size, 1, c.shape[1] * 3, 3))
           for c in crops]
    rows = {}

    def resize_only():
        for c in cts:
            up(c, (224, 224), False, None, None)
    rows["floor: resize only"] = _per_image(resize_only, n)

    u8 = torch.stack([up(c, (224, 224), False, None, None)[0].permute(1, 2, 0) for c in cts[:B]])  # (B,224,224,3)
    out = torch.empty((B, 3, 224, 224), dtype=torch.float32)
    affine = aug._affine()
    sc = [float(v) for v in affine[0]]
    bi = [torch.tensor(float(v)) for v in affine[1]]
    on, u8n = out.numpy(), u8.numpy()

    def write_only():  # the fused path's second half: torch's cast copy_ (de-interleaves), then 3 fma planes
        for _ in range(nb):
            for k in range(B):
                ot = out[k]
                ot.copy_(u8[k].permute(2, 0, 1))
                for ch, p in enumerate(ot.unbind(0)):
                    torch.add(bi[ch], p, alpha=sc[ch], out=p)
    rows["floor: write only (torch cast copy_ + fma per plane, per sample)"] = _per_image(write_only, n)

    from memstrata.data import kernels

    if kernels.available():  # the compiled path's second half: one pass, uint8 HWC -> normalised float CHW
        sc64, bi64 = kernels.affine64(affine, 1 / 255)
        onf = on.reshape(B, 3, -1)
        u8f = [u8n[k].reshape(-1) for k in range(B)]

        def write_compiled():
            for _ in range(nb):
                for k in range(B):
                    kernels.to_chw_affine(u8f[k], onf, k, sc64, bi64)
        rows[f"floor: write only (compiled one-pass kernel, {kernels.form()})"] = _per_image(write_compiled, n)

    def write_numpy():  # the previous fused path's second half
        for _ in range(nb):
            for k in range(B):
                np.copyto(on[k], u8n[k].transpose(2, 0, 1), casting="unsafe")
                ot = out[k]
                for ch in range(3):
                    torch.add(bi[ch], ot[ch], alpha=sc[ch], out=ot[ch])
    rows["   (previous: numpy strided cast + fma per plane)"] = _per_image(write_numpy, n)

    def write_torch_copy():
        for _ in range(nb):
            out.copy_(u8.permute(0, 3, 1, 2))
    rows["floor: uint8 NHWC -> float NCHW copy_ only, batched (no normalise)"] = _per_image(write_torch_copy, n)

    def memset():
        for _ in range(nb):
            out.fill_(1.0)
    rows["floor: fill the float32 output (bandwidth)"] = _per_image(memset, n)
    rows["floor estimate: resize only + fill (one pass over the output)"] = \
        rows["floor: resize only"] + rows["floor: fill the float32 output (bandwidth)"]

    pool = OutputPool()

    def fused():
        for b in range(nb):
            s = slice(b * B, (b + 1) * B)
            o = pool.get((B, 3, 224, 224))
            resized_crop_fused(imgs[s], boxes[s], flips[s], (224, 224), o, affine)
    rows["floor: resize + write (resized_crop_fused, params given)"] = _per_image(fused, n)

    def augment():
        for b in range(nb):
            s = slice(b * B, (b + 1) * B)
            bx, fl = aug.params(0, 1, idx[s], [x.shape[0] for x in imgs[s]], [x.shape[1] for x in imgs[s]])
            aug(imgs[s], bx, fl, pool=pool)
    rows["memstrata: params + augment"] = _per_image(augment, n)

    def read():
        for b in range(nb):
            st.fetch_many(idx[b * B:(b + 1) * B])
    rows["memstrata: store read (fetch_many)"] = _per_image(read, n)

    lo = TieredLoader(a.root, B, seed=0, epochs=3, device="cpu", store_dir=a.store, num_workers=1, prefetch=0,
                      progress=False)
    for _ in lo:  # epoch 1: verifies crcs
        pass

    def loader():
        for _x, _y in lo:
            pass
    rows["memstrata: TieredLoader epoch (sync, 1 thread)"] = _per_image(loader, lo.n, repeats=2)
    lo.close()

    w = max(len(k) for k in rows)
    print(f"{'one thread, CPU time per image':<{w}}  {'us':>8}  {'images / CPU-s':>14}")
    for k, v in rows.items():
        print(f"{k:<{w}}  {v * 1e6:8.1f}  {1 / v:14,.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({k: {"us_per_image": v * 1e6, "images_per_cpu_s": 1 / v} for k, v in rows.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
