import numpy as np, torch
import torchvision.transforms.v2.functional as TF
from memstrata.data.augment import TrainAugment
from memstrata.data.store import SampleStore
st = SampleStore("/tmp/loader-b/store1024", "/tmp/loader-b/synth1024", max_side=160)
idx = np.arange(256); imgs = [st.get(int(i)) for i in idx]
aug = TrainAugment()
boxes, flips = aug.params(0, 1, idx, [x.shape[0] for x in imgs], [x.shape[1] for x in imgs])
ours = aug(imgs, boxes, flips)
u8, f = [], []
for x, (t, l, h, w), fl in zip(imgs, boxes.tolist(), flips.tolist()):
    c = torch.from_numpy(x).permute(2, 0, 1)
    a = TF.resized_crop(c, t, l, h, w, [224, 224], antialias=True)
    b = TF.resized_crop(TF.to_dtype(c, torch.float32, scale=True), t, l, h, w, [224, 224], antialias=True)
    if fl: a, b = TF.horizontal_flip(a), TF.horizontal_flip(b)
    u8.append(a); f.append(b)
m, s = list(aug.mean), list(aug.std)
tv_u8 = TF.normalize(TF.to_dtype(torch.stack(u8), torch.float32, scale=True), m, s)
tv_f = TF.normalize(torch.stack(f), m, s)
d = lambda a, b: ((a - b).abs().max().item(), (a - b).abs().mean().item())
print("ours vs tv v2 uint8 path (to_dtype+normalize):", d(ours, tv_u8))
print("ours vs tv v2 float path:", d(ours, tv_f))
print("tv uint8 path vs tv float path:", d(tv_u8, tv_f))
print("one uint8 step in normalised units: ", 1 / 255 / min(s))
