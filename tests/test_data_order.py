"""Same samples, same order, same labels as torchvision's samplers and ImageFolder."""

import os
import tempfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from memstrata.data import TieredLoader, build_store, decode_file, epoch_order, synth_imagefolder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth_imagefolder(root, images=40, classes=4, seed=1, progress=False, size=(100, 80), workers=1)
    return root


@pytest.mark.parametrize("n,seed", [(37, 0), (10, 1234)])
def test_random_sampler_persistent_generator(n, seed):
    g = torch.Generator()
    g.manual_seed(seed)
    s = RandomSampler(range(n), generator=g)
    for e in range(3):
        assert list(s) == epoch_order(n, seed=seed, epoch=e, sampler="random").tolist()
    # random access to a later epoch replays the generator
    assert epoch_order(n, seed=seed, epoch=5, sampler="random").tolist() != \
        epoch_order(n, seed=seed, epoch=4, sampler="random").tolist()


def test_dataloader_shuffle_generator():
    n, seed = 23, 7
    g = torch.Generator()
    g.manual_seed(seed)
    dl = DataLoader(range(n), batch_size=4, shuffle=True, generator=g)
    for e in range(3):
        got = torch.cat(list(dl)).tolist()
        assert got == epoch_order(n, seed=seed, epoch=e, sampler="dataloader").tolist()


@pytest.mark.parametrize("n,world", [(20, 2), (23, 3), (5, 4)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_distributed_sampler(n, world, shuffle):
    for rank in range(world):
        s = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=11)
        for e in (0, 3):
            s.set_epoch(e)
            assert list(s) == epoch_order(n, seed=11, epoch=e, rank=rank, world_size=world, shuffle=shuffle).tolist()


def test_loader_same_samples_as_imagefolder(tiny, tmp_path):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(tiny)
    g = torch.Generator()
    g.manual_seed(5)
    sampler = RandomSampler(ds, generator=g)
    loader = TieredLoader(tiny, 8, seed=5, epochs=2, augment=None, store_dir=tmp_path / "s", progress=False,
                          num_workers=2)
    assert len(loader) == 5
    for e in range(2):  # epoch 0 decodes and builds the store, epoch 1 reads it
        want = list(sampler)
        got_imgs, got_labels = [], []
        for imgs, labels in loader:
            got_imgs += imgs
            got_labels += labels.tolist()
        assert got_labels == [ds.targets[i] for i in want]
        for i, img in zip(want, got_imgs):
            ref = torch.from_numpy(decode_file(ds.samples[i][0], 160)).permute(2, 0, 1)
            assert torch.equal(img, ref)
    assert loader.stats["source_reads"] == 40 and loader.stats["store_hits"] == 40


def test_loader_wraps_map_style_dataset(tmp_path):
    class Toy(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.full((3, 20, 30), i * 10, dtype=torch.uint8), i % 3

    loader = TieredLoader(Toy(), 5, seed=0, epochs=1, store_dir=tmp_path, progress=False, num_workers=0,
                          prefetch=0, augment=None)
    order = epoch_order(12, seed=0, epoch=0)
    out = [(img, y) for imgs, ys in loader for img, y in zip(imgs, ys.tolist())]
    assert [y for _, y in out] == [i % 3 for i in order]
    assert all(int(img[0, 0, 0]) == i * 10 and img.shape == (3, 20, 30) for (img, _), i in zip(out, order))


def _rank_worker(rank, world, root, store, port, outdir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = TieredLoader(root, 4, seed=3, epochs=2, store_dir=store, progress=False, num_workers=1,
                              augment=None)
        res = {}
        for e in range(2):
            loader.set_epoch(e)
            labels, sums = [], []
            for imgs, ys in loader:
                labels += ys.tolist()
                sums += [int(x.sum()) for x in imgs]
            res[e] = (labels, sums)
        aug = TieredLoader(root, 4, seed=3, epochs=2, store_dir=store, progress=False, num_workers=0, prefetch=0)
        aug.set_epoch(1)
        x, y = next(iter(aug))
        torch.save({"res": res, "x": x, "y": y}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)


def test_two_ranks_gloo_match_distributed_sampler(tiny, tmp_path):
    import socket

    import torch.multiprocessing as mp
    from torchvision.datasets import ImageFolder

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = tmp_path / "store"  # both ranks build it lazily, concurrently
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_worker, args=(r, 2, str(tiny), str(store), port, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    ds = ImageFolder(tiny)
    sums = {i: int(torch.from_numpy(decode_file(p, 160)).sum()) for i, (p, _) in enumerate(ds.samples)}
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        s = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=3)
        for e in range(2):
            s.set_epoch(e)
            want = list(s)
            labels, got_sums = got["res"][e]
            assert labels == [ds.targets[i] for i in want]
            assert got_sums == [sums[i] for i in want]
        assert got["x"].shape == (4, 3, 224, 224) and got["x"].dtype == torch.float32
    # the ranks' concurrent lazy builds left one complete, consistent store
    assert build_store(tiny, store, progress=False).built == 0
